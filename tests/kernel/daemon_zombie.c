/* Leave a zombie child that had a file mapped, next to a live parent that maps another.
 *
 *   daemon_zombie PARENT_FILE CHILD_FILE
 *
 * Maps PARENT_FILE and reads every page. The child maps CHILD_FILE, reads every page
 * and exits. The parent never reaps it: it prints "ready" once the child has exited
 * and waits for a signal.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int map_and_touch(const char *path)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0) {
        perror(path);
        return -1;
    }
    volatile unsigned char *map = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return -1;
    }
    unsigned long sum = 0;
    for (off_t off = 0; off < st.st_size; off += sysconf(_SC_PAGESIZE))
        sum += map[off];
    (void)sum;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PARENT_FILE CHILD_FILE\n", argv[0]);
        return 2;
    }
    if (map_and_touch(argv[1]) < 0)
        return 1;
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0)
        _exit(map_and_touch(argv[2]) < 0 ? 1 : 0);

    /* WNOWAIT: learn that the child exited but leave it a zombie. */
    siginfo_t info;
    if (waitid(P_PID, (id_t)child, &info, WEXITED | WNOWAIT) < 0) {
        perror("waitid");
        return 1;
    }
    if (info.si_status != 0)
        return 1;
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
