/* Start many processes that each map a file and wait.
 *
 *   daemon_fleet COUNT FILE...
 *
 * Forks COUNT - 1 children, so COUNT processes run in all. Every process maps one of
 * the FILEs (round robin) read-only and executable and reads every page. The parent
 * prints "ready" once every child has mapped its file, then waits for a signal; the
 * children die with it (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

static int map_and_touch(const char *path)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0)
        return -1;
    volatile unsigned char *map = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED)
        return -1;
    unsigned long sum = 0;
    for (off_t off = 0; off < st.st_size; off += sysconf(_SC_PAGESIZE))
        sum += map[off];
    close(fd);
    (void)sum;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s COUNT FILE...\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[1]);
    char **files = argv + 2;
    int nfiles = argc - 2;
    pid_t parent = getpid();
    int ready_pipe[2];
    if (pipe(ready_pipe) < 0) {
        perror("pipe");
        return 1;
    }

    for (int i = 1; i < count; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(1);
            char status = map_and_touch(files[i % nfiles]) < 0 ? 'f' : 'r';
            if (write(ready_pipe[1], &status, 1) != 1)
                _exit(1);
            for (;;)
                pause();
        }
    }
    if (map_and_touch(files[0]) < 0) {
        perror(files[0]);
        return 1;
    }
    for (int i = 1; i < count; i++) {
        char status;
        if (read(ready_pipe[0], &status, 1) != 1 || status != 'r') {
            fprintf(stderr, "a child failed to map its file\n");
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
