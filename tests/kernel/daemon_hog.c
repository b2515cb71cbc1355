/* Allocate anonymous memory until the kernel OOM-kills this process.
 *
 *   daemon_hog MAX_MIB
 *
 * Prints "ready", then allocates 4 MiB at a time and writes every byte, so every
 * page is charged to the memory cgroup at once, up to MAX_MIB. If it gets there
 * without being killed, it prints "not killed" and exits with status 3.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_BYTES (4L << 20)

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s MAX_MIB\n", argv[0]);
        return 2;
    }
    long max_chunks = atol(argv[1]) * (1L << 20) / CHUNK_BYTES;
    printf("ready\n");
    fflush(stdout);
    for (long i = 0; i < max_chunks; i++) {
        char *chunk = malloc(CHUNK_BYTES);
        if (chunk == NULL) {
            perror("malloc");
            return 1;
        }
        memset(chunk, 1, CHUNK_BYTES);
    }
    printf("not killed\n");
    fflush(stdout);
    return 3;
}
