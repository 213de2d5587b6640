/*
 * The floor for a userspace /dev/liveupdate: a minimal single-threaded C
 * server that answers every FUSE_IOCTL with a constant "result 0" reply.
 * No libfuse: one blocking read() and one write() per request, so any time
 * above this is the emulator's own.
 *
 *   baseline_server fuse MNTDIR   mount a one-file FUSE fs on MNTDIR; the
 *                                 file is MNTDIR/dev (S_IFREG 0666)
 *   baseline_server cuse NAME     a CUSE char device /dev/NAME (needs CUSE)
 *   baseline_server fuse-pvm MNTDIR  as fuse, but each ioctl also does what any
 *                                 FUSE-file server must to read/answer a LUO
 *                                 struct: process_vm_readv of the struct, and
 *                                 for GET_STATE process_vm_writev of it back.
 *
 * Prints "ready" once serving; exits when the connection ends (umount/kill).
 * Build: gcc -O2 -Wall -o baseline_server bench/baseline_server.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/fuse.h>

#define BUFSIZE (FUSE_MIN_READ_BUFFER > (132 * 1024) ? FUSE_MIN_READ_BUFFER : (132 * 1024))
#define CUSE_INIT_OP 4096

static char buf[BUFSIZE];
static int dev_fd;
static int pvm;

/* The caller-memory traffic of the emulator's FUSE-file path, in C. */
static int pvm_ioctl(const struct fuse_in_header *h, const struct fuse_ioctl_in *in)
{
	unsigned char st[16];
	struct iovec local = { st, sizeof(st) }, remote = { (void *)(uintptr_t)in->arg, sizeof(st) };
	if (process_vm_readv(h->pid, &local, 1, &remote, 1, 0) < 4)
		return -EFAULT;
	if (_IOC_NR(in->cmd) == 3) { /* GET_STATE: write the struct back */
		local.iov_len = remote.iov_len = 8;
		if (process_vm_writev(h->pid, &local, 1, &remote, 1, 0) != 8)
			return -EFAULT;
	}
	return 0;
}

static void reply(uint64_t unique, int err, const void *data, size_t len)
{
	struct fuse_out_header h = { .len = sizeof(h) + len, .error = -err, .unique = unique };
	struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)data, len } };
	if (writev(dev_fd, iov, len ? 2 : 1) < 0 && errno != ENOENT)
		perror("baseline: writev");
}

static void fill_attr(struct fuse_attr *a, uint64_t ino)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->mode = ino == FUSE_ROOT_ID ? (S_IFDIR | 0755) : (S_IFREG | 0666);
	a->nlink = ino == FUSE_ROOT_ID ? 2 : 1;
	a->blksize = 4096;
}

static void fuse_init(uint64_t unique, const struct fuse_init_in *in)
{
	struct fuse_init_out out = { 0 };
	out.major = FUSE_KERNEL_VERSION;
	out.minor = in->minor < FUSE_KERNEL_MINOR_VERSION ? in->minor : FUSE_KERNEL_MINOR_VERSION;
	out.max_readahead = in->max_readahead;
	out.max_background = 16;
	out.congestion_threshold = 12;
	out.max_write = 128 * 1024;
	out.time_gran = 1;
	reply(unique, 0, &out, sizeof(out));
}

static void cuse_init(uint64_t unique, const char *name)
{
	struct {
		struct cuse_init_out out;
		char devname[256];
	} r;
	memset(&r, 0, sizeof(r));
	r.out.major = FUSE_KERNEL_VERSION;
	r.out.minor = FUSE_KERNEL_MINOR_VERSION;
	r.out.flags = CUSE_UNRESTRICTED_IOCTL;
	r.out.max_read = 128 * 1024;
	r.out.max_write = 128 * 1024;
	int n = snprintf(r.devname, sizeof(r.devname), "DEVNAME=%s", name);
	reply(unique, 0, &r, sizeof(r.out) + n + 1);
}

int main(int argc, char **argv)
{
	if (argc != 3 || (strcmp(argv[1], "fuse") && strcmp(argv[1], "cuse") && strcmp(argv[1], "fuse-pvm"))) {
		fprintf(stderr, "usage: baseline_server fuse|fuse-pvm MNTDIR | cuse NAME\n");
		return 2;
	}
	pvm = !strcmp(argv[1], "fuse-pvm");
	int cuse = !strcmp(argv[1], "cuse");
	dev_fd = open(cuse ? "/dev/cuse" : "/dev/fuse", O_RDWR | O_CLOEXEC);
	if (dev_fd < 0) {
		perror(cuse ? "/dev/cuse" : "/dev/fuse");
		return 1;
	}
	if (!cuse) {
		char opts[128];
		snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", dev_fd);
		if (mount("bench-baseline", argv[2], "fuse.bench-baseline", MS_NOSUID | MS_NODEV, opts)) {
			perror("mount");
			return 1;
		}
		printf("ready\n");
		fflush(stdout);
	}
	struct fuse_ioctl_out ioctl_out = { .result = 0 };
	for (;;) {
		ssize_t n = read(dev_fd, buf, sizeof(buf));
		if (n < 0) {
			if (errno == EINTR || errno == ENOENT)
				continue;
			if (errno == ENODEV)
				return 0;
			perror("baseline: read");
			return 1;
		}
		if ((size_t)n < sizeof(struct fuse_in_header))
			continue;
		struct fuse_in_header *h = (struct fuse_in_header *)buf;
		void *body = buf + sizeof(*h);
		switch (h->opcode) {
		case FUSE_IOCTL:
			if (pvm) {
				int r = pvm_ioctl(h, body);
				if (r < 0) {
					reply(h->unique, -r, NULL, 0);
					break;
				}
			}
			reply(h->unique, 0, &ioctl_out, sizeof(ioctl_out));
			break;
		case FUSE_INIT:
			fuse_init(h->unique, body);
			break;
		case CUSE_INIT_OP:
			cuse_init(h->unique, argv[2]);
			printf("ready\n");
			fflush(stdout);
			break;
		case FUSE_LOOKUP: {
			if (h->nodeid != FUSE_ROOT_ID || strcmp(body, "dev")) {
				reply(h->unique, ENOENT, NULL, 0);
				break;
			}
			struct fuse_entry_out e = { .nodeid = 2, .entry_valid = 86400, .attr_valid = 86400 };
			fill_attr(&e.attr, 2);
			reply(h->unique, 0, &e, sizeof(e));
			break;
		}
		case FUSE_GETATTR: {
			struct fuse_attr_out a = { .attr_valid = 86400 };
			fill_attr(&a.attr, h->nodeid);
			reply(h->unique, 0, &a, sizeof(a));
			break;
		}
		case FUSE_OPEN:
		case FUSE_OPENDIR: {
			struct fuse_open_out o = { .fh = 1, .open_flags = cuse ? 0 : FOPEN_DIRECT_IO };
			reply(h->unique, 0, &o, sizeof(o));
			break;
		}
		case FUSE_RELEASE:
		case FUSE_RELEASEDIR:
		case FUSE_FLUSH:
		case FUSE_DESTROY:
			reply(h->unique, 0, NULL, 0);
			break;
		case FUSE_FORGET:
		case FUSE_BATCH_FORGET:
		case FUSE_INTERRUPT:
			break;
		default:
			reply(h->unique, ENOSYS, NULL, 0);
		}
	}
}
