#define _GNU_SOURCE
#include "prelock_native.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_mlock2
#define SYS_mlock2 325 /* x86_64 */
#endif

#ifndef SYS_cachestat
#define SYS_cachestat 451 /* the same number on every architecture, Linux 6.5+ */
#endif

/* _IOWR('f', 17, struct procmap_query) */
#define PL_PROCMAP_QUERY _IOWR('f', 17, struct pl_procmap_query)

struct pl_cachestat_range {
    uint64_t off;
    uint64_t len;
};

static int result(long rc)
{
    return rc < 0 ? -errno : (int)rc;
}

int pl_mlockall(int flags)
{
    return result(mlockall(flags));
}

int pl_munlockall(void)
{
    return result(munlockall());
}

int pl_mlock2(uintptr_t addr, size_t length, unsigned int flags)
{
    return result(syscall(SYS_mlock2, (void *)addr, length, flags));
}

int pl_munlock(uintptr_t addr, size_t length)
{
    return result(munlock((void *)addr, length));
}

int pl_mmap_file(int fd, size_t length, int64_t offset, uintptr_t *addr_out)
{
    void *addr;

    if (length == 0 || addr_out == NULL)
        return -EINVAL;
    addr = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (addr == MAP_FAILED)
        return -errno;
    *addr_out = (uintptr_t)addr;
    return 0;
}

int pl_munmap(uintptr_t addr, size_t length)
{
    return result(munmap((void *)addr, length));
}

int pl_madvise(uintptr_t addr, size_t length, int advice)
{
    return result(madvise((void *)addr, length, advice));
}

int pl_mincore(uintptr_t addr, size_t length, unsigned char *vec)
{
    if (vec == NULL)
        return -EINVAL;
    return result(mincore((void *)addr, length, vec));
}

int pl_cachestat(int fd, uint64_t offset, uint64_t length, struct pl_cachestat *out)
{
    struct pl_cachestat_range range = { offset, length };

    if (out == NULL)
        return -EINVAL;
    return result(syscall(SYS_cachestat, fd, &range, out, 0));
}

int pl_procmap_query(int maps_fd, struct pl_procmap_query *query)
{
    if (query == NULL)
        return -EINVAL;
    query->size = sizeof(*query);
    return result(ioctl(maps_fd, PL_PROCMAP_QUERY, query));
}

int pl_fstatfs_type(int fd, int64_t *type_out)
{
    struct statfs buf;

    if (type_out == NULL)
        return -EINVAL;
    if (fstatfs(fd, &buf) < 0)
        return -errno;
    *type_out = (int64_t)buf.f_type;
    return 0;
}
