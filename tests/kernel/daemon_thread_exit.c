/* A process whose main thread exited while another thread keeps a file mapped.
 *
 *   daemon_thread_exit FILE
 *
 * Maps FILE read-only and executable and reads every page. The main thread then calls
 * pthread_exit. The other thread waits until /proc/PID/maps reads empty, which is what
 * the kernel shows once the main thread is gone, prints "ready" and waits for a signal.
 * /proc/PID/task/TID/maps of that thread still lists every mapping.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void *wait_for_main_exit(void *arg)
{
    (void)arg;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)getpid());
    for (;;) {
        char byte;
        int fd = open(path, O_RDONLY);
        ssize_t got = fd < 0 ? -1 : read(fd, &byte, 1);
        if (fd >= 0)
            close(fd);
        if (got == 0)
            break;
        usleep(10000);
    }
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0) {
        perror(argv[1]);
        return 1;
    }
    volatile unsigned char *map = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    unsigned long sum = 0;
    for (off_t off = 0; off < st.st_size; off += sysconf(_SC_PAGESIZE))
        sum += map[off];
    (void)sum;

    pthread_t thread;
    if (pthread_create(&thread, NULL, wait_for_main_exit, NULL) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        return 1;
    }
    pthread_exit(NULL);
}
