/* Other processes' memory: pidfd, /proc/PID/pagemap, PAGEMAP_SCAN and
 * process_vm_readv/writev. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include "wp_kernel.h"
#include "wp.h"

int wp_pidfd_open(int pid)
{
	int fd = syscall(SYS_pidfd_open, pid, 0);
	return fd < 0 ? -errno : fd;
}

int wp_pidfd_getfd(int pidfd, int targetfd)
{
	int fd = syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
	return fd < 0 ? -errno : fd;
}

int64_t wp_pagemap_read(int pagemap_fd, uint64_t addr, uint64_t npages, uint64_t *out)
{
	uint64_t page = sysconf(_SC_PAGESIZE);
	ssize_t n = pread(pagemap_fd, out, npages * 8, (off_t)(addr / page) * 8);
	return n < 0 ? -errno : n / 8;
}

int64_t wp_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
			uint64_t category_mask, uint64_t category_inverted,
			uint64_t category_anyof_mask, uint64_t return_mask,
			uint64_t max_pages, struct wp_page_region *out, uint64_t nout,
			uint64_t *walk_end)
{
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = flags,
		.start = start,
		.end = end,
		.vec = (uint64_t)(uintptr_t)out,
		.vec_len = nout,
		.max_pages = max_pages,
		.category_inverted = category_inverted,
		.category_mask = category_mask,
		.category_anyof_mask = category_anyof_mask,
		.return_mask = return_mask,
	};
	long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
	if (n < 0)
		return -errno;
	*walk_end = arg.walk_end;
	return n;
}

/* process_vm_readv takes at most IOV_MAX (1024) remote iovecs per call,
 * and moves at most MAX_RW_COUNT (~2 GiB) per call: VM_RW_MAX per call here.
 * Consecutive chunks go in one iovec: the kernel pins a remote iovec's pages
 * up to 16 at a time, taking the target's mmap lock for each batch, so a
 * page per iovec costs a lock round trip and a page walk per page (a dedupe
 * pass over 1 GiB, read and hashed: 0.36 s with a page per iovec, 0.25 s). */
#define VM_RW_MAX (1ULL << 30)

static int64_t vm_rw(int write, int pid, void *local, const uint64_t *addrs,
		     uint64_t n, uint64_t chunk)
{
	struct iovec liov, riov[IOV_MAX];
	uint64_t done = 0;
	while (done < n) {
		uint64_t k = 0, nv = 0;
		while (done + k < n && (k == 0 || (k + 1) * chunk <= VM_RW_MAX)) {
			uint64_t a = addrs[done + k];
			if (nv && (uint64_t)(uintptr_t)riov[nv - 1].iov_base + riov[nv - 1].iov_len == a) {
				riov[nv - 1].iov_len += chunk;
			} else if (nv < IOV_MAX) {
				riov[nv].iov_base = (void *)(uintptr_t)a;
				riov[nv].iov_len = chunk;
				nv++;
			} else {
				break;
			}
			k++;
		}
		liov.iov_base = (char *)local + done * chunk;
		liov.iov_len = k * chunk;
		ssize_t r = write ? process_vm_writev(pid, &liov, 1, riov, nv, 0)
				  : process_vm_readv(pid, &liov, 1, riov, nv, 0);
		if (r < 0)
			return done ? (int64_t)(done * chunk) : -errno;
		done += r / chunk;
		if ((uint64_t)r < k * chunk)
			return done * chunk + r % chunk;
	}
	return done * chunk;
}

int64_t wp_vm_read(int pid, void *local, const uint64_t *addrs, uint64_t n, uint64_t chunk)
{
	return vm_rw(0, pid, local, addrs, n, chunk);
}

int64_t wp_vm_write(int pid, const void *local, const uint64_t *addrs, uint64_t n, uint64_t chunk)
{
	return vm_rw(1, pid, (void *)local, addrs, n, chunk);
}
