/* Fork short-lived processes that map files, for a daemon scanning while targets exit.
 *
 *   daemon_churn DURATION_MS MAX_ALIVE MAX_LIFE_MS FILE...
 *
 * For DURATION_MS, keeps up to MAX_ALIVE children alive. Each child maps one of the
 * FILEs read-only and executable, reads one byte of every page, lives a random time
 * of up to MAX_LIFE_MS and exits. The parent reaps children only when MAX_ALIVE are
 * alive, so exited children stay zombies for a while too. Prints "ready" once the
 * first child has started and "done CHILDREN" after the last child was reaped.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void run_child(const char *path, long life_ms, pid_t parent)
{
    /* The test ends the parent by PID, and the kernel then ends the children. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0)
        _exit(1);
    volatile unsigned char *map = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED)
        _exit(1);
    unsigned long sum = 0;
    for (off_t off = 0; off < st.st_size; off += sysconf(_SC_PAGESIZE))
        sum += map[off];
    (void)sum;
    usleep((useconds_t)(life_ms * 1000));
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s DURATION_MS MAX_ALIVE MAX_LIFE_MS FILE...\n", argv[0]);
        return 2;
    }
    long duration_ms = atol(argv[1]);
    int max_alive = atoi(argv[2]);
    long max_life_ms = atol(argv[3]);
    char **files = argv + 4;
    int nfiles = argc - 4;
    pid_t self = getpid();

    srand((unsigned)self);
    long end_ms = now_ms() + duration_ms;
    long started = 0;
    int alive = 0;
    while (now_ms() < end_ms) {
        if (alive >= max_alive) {
            if (wait(NULL) > 0)
                alive--;
            continue;
        }
        long life_ms = max_life_ms > 0 ? rand() % (max_life_ms + 1) : 0;
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            break;
        }
        if (pid == 0)
            run_child(files[started % nfiles], life_ms, self);
        alive++;
        if (started++ == 0) {
            printf("ready\n");
            fflush(stdout);
        }
    }
    while (wait(NULL) > 0)
        ;
    printf("done %ld\n", started);
    fflush(stdout);
    return 0;
}
