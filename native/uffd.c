/* userfaultfd: thin wrappers that return -errno, one per ioctl. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "wp_kernel.h"
#include "wp.h"

#define NEG_ERRNO(expr) ((expr) < 0 ? -errno : 0)

uint64_t wp_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int wp_uffd_create(int flags)
{
	int fd = syscall(SYS_userfaultfd, flags);
	return fd < 0 ? -errno : fd;
}

int wp_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int wp_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	*ioctls_out = reg.ioctls;
	return 0;
}

int wp_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	return NEG_ERRNO(ioctl(fd, UFFDIO_UNREGISTER, &range));
}

int wp_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect wp = { .range = { start, len }, .mode = mode };
	return NEG_ERRNO(ioctl(fd, UFFDIO_WRITEPROTECT, &wp));
}

int wp_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	return NEG_ERRNO(ioctl(fd, UFFDIO_WAKE, &range));
}

/* The filling ioctls report progress in a field of their own: on a partial
 * failure it holds -errno, or the bytes done before the failure. */
int64_t wp_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_zeropage z = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_ZEROPAGE, &z) < 0)
		return z.zeropage < 0 ? z.zeropage : -errno;
	return z.zeropage;
}

int64_t wp_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
	struct uffdio_copy c = { .dst = dst, .src = src, .len = len, .mode = mode };
	if (ioctl(fd, UFFDIO_COPY, &c) < 0)
		return c.copy < 0 ? c.copy : -errno;
	return c.copy;
}

int64_t wp_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_continue c = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_CONTINUE, &c) < 0)
		return c.mapped < 0 ? c.mapped : -errno;
	return c.mapped;
}

int64_t wp_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode)
{
	struct uffdio_move m = { .dst = dst, .src = src, .len = len, .mode = mode };
	if (ioctl(fd, UFFDIO_MOVE, &m) < 0)
		return m.move < 0 ? m.move : -errno;
	return m.move;
}

static void decode(const struct uffd_msg *m, struct wp_msg *out, uint64_t now)
{
	memset(out, 0, sizeof(*out));
	out->event = m->event;
	out->t_read_ns = now;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		out->addr = m->arg.pagefault.address;
		out->flags = m->arg.pagefault.flags;
		out->tid = m->arg.pagefault.feat.ptid;
		break;
	case UFFD_EVENT_FORK:
		out->arg1 = m->arg.fork.ufd;
		break;
	case UFFD_EVENT_REMAP:
		out->addr = m->arg.remap.from;
		out->arg1 = m->arg.remap.to;
		out->arg2 = m->arg.remap.len;
		break;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		out->addr = m->arg.remove.start;
		out->arg1 = m->arg.remove.end;
		break;
	}
}

int wp_uffd_read(int fd, struct wp_msg *out, int max)
{
	struct uffd_msg buf[64];
	if (max > 64)
		max = 64;
	ssize_t n = read(fd, buf, sizeof(buf[0]) * max);
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	uint64_t now = wp_now_ns();
	int count = n / sizeof(buf[0]);
	for (int i = 0; i < count; i++)
		decode(&buf[i], &out[i], now);
	return count;
}
