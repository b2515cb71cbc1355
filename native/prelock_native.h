/* The syscalls prelock makes that Python's standard library cannot.
 * Every function validates its arguments, makes one syscall and returns 0 (or a
 * non-negative result) on success and -errno on failure. No logging, no policy. */
#ifndef PRELOCK_NATIVE_H
#define PRELOCK_NATIVE_H

#include <stddef.h>
#include <stdint.h>

struct pl_cachestat {
    uint64_t nr_cache;
    uint64_t nr_dirty;
    uint64_t nr_writeback;
    uint64_t nr_evicted;
    uint64_t nr_recently_evicted;
};

/* struct procmap_query from <linux/fs.h> (Linux 6.11+), declared here because the
 * build host's headers may be older than the kernel the daemon runs on. */
struct pl_procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};

int pl_mlockall(int flags);
int pl_munlockall(void);
int pl_mlock2(uintptr_t addr, size_t length, unsigned int flags);
int pl_munlock(uintptr_t addr, size_t length);
int pl_mmap_file(int fd, size_t length, int64_t offset, uintptr_t *addr_out);
int pl_munmap(uintptr_t addr, size_t length);
int pl_madvise(uintptr_t addr, size_t length, int advice);
int pl_mincore(uintptr_t addr, size_t length, unsigned char *vec);
int pl_cachestat(int fd, uint64_t offset, uint64_t length, struct pl_cachestat *out);
int pl_procmap_query(int maps_fd, struct pl_procmap_query *query);
int pl_fstatfs_type(int fd, int64_t *type_out);

#endif
