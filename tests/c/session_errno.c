/*
 * Every errno rule of the session ABI (spec luo-session.md sections 2-7, 11 and 12) from a
 * compiled caller: the same binary judges the emulator (profiles 6.19 and 7.2, under `cusedev run`)
 * and the real kernel (7.2), so a row that passes on both says the emulator answers as the kernel does.
 *
 *   session_errno --abi 6.19|7.2 --stage 1|2 [--device PATH]
 *
 * Stage 1 (before a live update) runs the rows that need no kexec, then makes the sessions stage 2
 * needs, closes the device and leaves a daemon holding their fds (sessions cross only while held).
 * Stage 2 (after the kexec: `cusedev kexec`, or a real one) runs the rows on the carried sessions.
 * Each row has its own set-up and prints "ok ROW" or "FAIL ROW: expected X got Y"; the last line is
 * "session_errno stage N abi A: R rows, F failed".  The exit status is 1 when a row failed.
 * Session names start with "cerr-", so the rows share a device with other clients' sessions.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include "luo_session.h"

#define IO(nr) _IO(LIVEUPDATE_IOCTL_TYPE, nr)
#define CREATE IO(LIVEUPDATE_CMD_CREATE_SESSION)
#define RETRIEVE IO(LIVEUPDATE_CMD_RETRIEVE_SESSION)
#define PRESERVE IO(LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
#define RETRIEVE_FD IO(LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
#define FINISH IO(LIVEUPDATE_CMD_SESSION_FINISH)
#define GET_NAME IO(LIVEUPDATE_CMD_SESSION_GET_NAME)
#define FILES_CAP_619 128

typedef struct liveupdate_ioctl_create_session create_t;
typedef struct liveupdate_session_preserve_fd preserve_t;
typedef struct liveupdate_session_retrieve_fd retrieve_fd_t;
typedef struct liveupdate_session_finish finish_t;
typedef struct liveupdate_session_get_name get_name_t;

static const char *path = "/dev/liveupdate";
static int v72;  /* the 7.2 profile's rules, else 6.19's */
static int dev = -1;
static int rows, failed;
static char why[512];  /* the first failed expectation of the current row */

/* ------------------------------------------------------------------------------------ expectations */
static const char *ename(int e)
{
	static char other[16];
	switch (e) {
	case 0: return "0";
	case EINVAL: return "EINVAL";
	case EFAULT: return "EFAULT";
	case ENOTTY: return "ENOTTY";
	case E2BIG: return "E2BIG";
	case EMFILE: return "EMFILE";
	case EEXIST: return "EEXIST";
	case ENOENT: return "ENOENT";
	case EBADF: return "EBADF";
	case EBUSY: return "EBUSY";
	case ENOSPC: return "ENOSPC";
	case ENOMEM: return "ENOMEM";
	case EPERM: return "EPERM";
	case ENXIO: return "ENXIO";
	}
	snprintf(other, sizeof(other), "errno %d", e);
	return other;
}

static void fail(const char *fmt, ...)
{
	if (why[0])
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
}

/* The call's result: 0, or the errno it failed with. */
static int call(int fd, unsigned long cmd, void *arg)
{
	return ioctl(fd, cmd, arg) ? errno : 0;
}

static void want(const char *what, int got, int expected)
{
	if (got != expected)
		fail("%s: expected %s got %s", what, ename(expected), ename(got));
}

static void check(const char *what, long got, long expected)
{
	if (got != expected)
		fail("%s: expected %ld got %ld", what, expected, got);
}

static void row(const char *name, void (*fn)(void))
{
	why[0] = 0;
	fn();
	rows++;
	if (why[0]) {
		failed++;
		printf("FAIL %s: %s\n", name, why);
	} else {
		printf("ok %s\n", name);
	}
	fflush(stdout);
}

/* ------------------------------------------------------------------------------------------ helpers */
/* FUSE and CUSE deliver a close's RELEASE after close() returns: one device round trip orders it. */
static void settle(void)
{
	ioctl(dev, IO(0x7f), NULL);
}

static void close_settle(int fd)
{
	close(fd);
	settle();
}

static create_t named(const char *name)
{
	create_t c = { .size = sizeof(c), .fd = -1 };
	size_t n = strlen(name);
	memcpy(c.name, name, n < sizeof(c.name) ? n : sizeof(c.name));
	return c;
}

/* CREATE (or RETRIEVE) of NAME; the fd, or -1 with the failure recorded. */
static int session(unsigned long cmd, const char *name)
{
	create_t c = named(name);
	int e = call(dev, cmd, &c);
	if (e) {
		fail("%s %s: expected 0 got %s", cmd == CREATE ? "CREATE" : "RETRIEVE", name, ename(e));
		return -1;
	}
	return c.fd;
}

/* CREATE of NAME once a session of that name, dropped by the emulator's own close, is released. */
static int create_after_release(const char *name)
{
	create_t c = named(name);
	int e = 0;
	for (int i = 0; i < 100; i++) {
		settle();
		if ((e = call(dev, CREATE, &c)) != EEXIST)
			break;
		usleep(10000);
	}
	if (e) {
		fail("CREATE %s: expected 0 got %s", name, ename(e));
		return -1;
	}
	return c.fd;
}

static int pres(int s, int fd, __u64 token)
{
	preserve_t p = { .size = sizeof(p), .fd = fd, .token = token };
	return call(s, PRESERVE, &p);
}

static int rfd(int s, __u64 token, int *out)
{
	retrieve_fd_t r = { .size = sizeof(r), .fd = -1, .token = token };
	int e = call(s, RETRIEVE_FD, &r);
	if (out)
		*out = e ? -1 : r.fd;
	return e;
}

static int fin(int s, __u32 reserved)
{
	finish_t f = { .size = sizeof(f), .reserved = reserved };
	return call(s, FINISH, &f);
}

static int memfd(const char *data, unsigned flags)
{
	int fd = memfd_create("cerr", MFD_CLOEXEC | flags);
	if (fd < 0 || write(fd, data, strlen(data)) != (ssize_t)strlen(data) || lseek(fd, 0, SEEK_SET))
		fail("memfd: %s", strerror(errno));
	return fd;
}

/* RLIMIT_NOFILE lowered to the lowest free descriptor: no fd can be reserved until restore_fds(). */
static struct rlimit saved_nofile;

static void no_free_fd(void)
{
	getrlimit(RLIMIT_NOFILE, &saved_nofile);
	int lowest = dup(0);
	close(lowest);
	struct rlimit r = { .rlim_cur = (rlim_t)lowest, .rlim_max = saved_nofile.rlim_max };
	setrlimit(RLIMIT_NOFILE, &r);
}

static void restore_fds(void)
{
	setrlimit(RLIMIT_NOFILE, &saved_nofile);
}

static int fd_is_cloexec_rdwr(int fd)
{
	return (fcntl(fd, F_GETFD) & FD_CLOEXEC) && (fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR;
}

/* ======================================= stage 1: the device's dispatch (section 3) ============== */
static void dev_nr_out_of_range_einval(void)
{
	unsigned long cmds[] = { 0xBA02, 0xBA07, 0xAB07, 0xBA1B, 0xBA40, 0xBAFF };
	for (unsigned i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		create_t c = named("cerr-nr");
		char what[32];
		snprintf(what, sizeof(what), "cmd %#lx", cmds[i]);
		want(what, call(dev, cmds[i], &c), EINVAL);
	}
}

static void dev_size_unreadable_efault(void)
{
	want("CREATE NULL", call(dev, CREATE, NULL), EFAULT);
	want("RETRIEVE NULL", call(dev, RETRIEVE, NULL), EFAULT);
}

static void dev_cmd_mismatch_enotty(void)
{
	unsigned long cmds[] = { 0xAB00, 0xAB01, _IOWR(LIVEUPDATE_IOCTL_TYPE, 0, create_t) };
	for (unsigned i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		create_t c = named("cerr-enotty");
		char what[32];
		snprintf(what, sizeof(what), "cmd %#lx", cmds[i]);
		want(what, call(dev, cmds[i], &c), ENOTTY);
	}
}

static void dev_size_below_min_einval(void)
{
	__u32 sizes[] = { 0, 8, 71 };
	for (unsigned i = 0; i < 3; i++) {
		create_t c = named("cerr-small");
		c.size = sizes[i];
		char what[32];
		snprintf(what, sizeof(what), "CREATE size %u", sizes[i]);
		want(what, call(dev, CREATE, &c), EINVAL);
		snprintf(what, sizeof(what), "RETRIEVE size %u", sizes[i]);
		want(what, call(dev, RETRIEVE, &c), EINVAL);
	}
}

/* A struct larger than sizeof: the tail must be zero (E2BIG), is never written, and the rest echoes. */
static void dev_tail_e2big_zero_tail_ok(void)
{
	struct { create_t c; unsigned char tail[8]; } big;
	memset(&big, 0, sizeof(big));
	big.c = named("cerr-tail");
	big.c.size = sizeof(big);
	big.tail[7] = 1;
	want("CREATE tail byte 79 = 1", call(dev, CREATE, &big), E2BIG);
	big.tail[7] = 0;
	big.c.fd = -1;
	want("CREATE zero tail", call(dev, CREATE, &big), 0);
	check("size echoed", big.c.size, sizeof(big));
	check("name echoed", memcmp(big.c.name, "cerr-tail\0", 10), 0);
	check("tail untouched", big.tail[0] | big.tail[7], 0);
	if (big.c.fd < 0 || !fd_is_cloexec_rdwr(big.c.fd))
		fail("CREATE: fd %d is not an O_RDWR, close-on-exec descriptor", big.c.fd);
	if (big.c.fd >= 0)
		close_settle(big.c.fd);
}

/* The struct's tail runs into an unmapped page: copy_struct_from_user faults. */
static void dev_struct_fault_efault(void)
{
	long pg = sysconf(_SC_PAGESIZE);
	unsigned char *m = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		fail("mmap: %s", strerror(errno));
		return;
	}
	munmap(m + pg, pg);
	create_t *c = (create_t *)(m + pg - 76);  /* 76 bytes readable; size 80 reaches 4 past the page */
	*c = named("cerr-fault");
	c->size = 80;
	memset((char *)c + 72, 0, 4);
	want("CREATE across an unmapped page", call(dev, CREATE, c), EFAULT);
	munmap(m, pg);
	int s = session(CREATE, "cerr-fault");  /* nothing was created */
	if (s >= 0)
		close_settle(s);
}

/* The copy-out faults (read-only struct): EFAULT, and the new session is destroyed. */
static void create_copyout_fault_efault(void)
{
	long pg = sysconf(_SC_PAGESIZE);
	create_t *c = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED) {
		fail("mmap: %s", strerror(errno));
		return;
	}
	*c = named("cerr-ro");
	mprotect(c, pg, PROT_READ);
	want("CREATE into a read-only struct", call(dev, CREATE, c), EFAULT);
	munmap(c, pg);
	int s = create_after_release("cerr-ro");  /* the session went with the failed copy-out */
	if (s >= 0)
		close_settle(s);
}

/* RETRIEVE_SESSION's copy-out faults: EFAULT, and the dropped fd's implicit FINISH consumed it. */
static void retrieve_copyout_fault_efault(void)
{
	long pg = sysconf(_SC_PAGESIZE);
	create_t *c = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED) {
		fail("mmap: %s", strerror(errno));
		return;
	}
	*c = named("cerr-rs-ro");
	mprotect(c, pg, PROT_READ);
	want("RETRIEVE into a read-only struct", call(dev, RETRIEVE, c), EFAULT);
	munmap(c, pg);
	create_t r = named("cerr-rs-ro");
	int e = 0;
	for (int i = 0; i < 100; i++) {  /* the emulator's release of the dropped fd may lag (EINVAL) */
		settle();
		if ((e = call(dev, RETRIEVE, &r)) != EINVAL)
			break;
		usleep(10000);
	}
	want("RETRIEVE after the failed copy-out", e, ENOENT);
	if (!e)
		close_settle(r.fd);
}

/* RETRIEVE_FD's copy-out faults: EFAULT, and the file stays retrieved: asking again gives it. */
static void retrieve_fd_copyout_fault_efault(void)
{
	int s = session(RETRIEVE, "cerr-rfd-ro"), fd = -1;
	long pg = sysconf(_SC_PAGESIZE);
	retrieve_fd_t *r = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s < 0 || r == MAP_FAILED) {
		fail("set-up: %s", strerror(errno));
		return;
	}
	r->size = sizeof(*r);
	r->fd = -1;
	r->token = 7;
	mprotect(r, pg, PROT_READ);
	want("RETRIEVE_FD into a read-only struct", call(s, RETRIEVE_FD, r), EFAULT);
	munmap(r, pg);
	want("RETRIEVE_FD again", rfd(s, 7, &fd), 0);
	char got[8] = { 0 };
	if (fd >= 0 && (pread(fd, got, 7, 0) != 7 || memcmp(got, "payload", 7)))
		fail("the retrieved memfd lost its data");
	close(fd);
	want("FINISH", fin(s, 0), 0);
	close_settle(s);
}

/* ======================================= stage 1: the device and a session as files (2, 6) ======== */
/* One open file at a time: a second open, a /proc re-open, gives EBUSY; O_PATH never reaches the driver. */
static void dev_exclusive_open_ebusy(void)
{
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", dev);
	int fd = open(path, O_RDWR | O_CLOEXEC), e = fd < 0 ? errno : 0;
	want("a second open", e, EBUSY);
	if (fd >= 0)
		close_settle(fd);
	fd = open(proc, O_RDWR | O_CLOEXEC), e = fd < 0 ? errno : 0;
	want("a re-open through /proc", e, EBUSY);
	if (fd >= 0)
		close_settle(fd);
	fd = open(path, O_PATH | O_CLOEXEC), e = fd < 0 ? errno : 0;
	want("an O_PATH open", e, 0);
	if (fd >= 0) {
		create_t c = named("cerr-opath");
		want("CREATE on the O_PATH fd", call(fd, CREATE, &c), EBADF);
		close(fd);
	}
}

/* A session fd is an anonymous file: no re-open (ENXIO); read and write are EINVAL on both kinds. */
static void files_reopen_and_read_write(void)
{
	int s = session(CREATE, "cerr-file-ops");
	if (s < 0)
		return;
	char proc[64], b = 0;
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", s);
	int fd = open(proc, O_RDWR | O_CLOEXEC), e = fd < 0 ? errno : 0;
	want("a re-open of a session fd through /proc", e, ENXIO);
	if (fd >= 0)
		close_settle(fd);
	want("read on the device", read(dev, &b, 1) < 0 ? errno : 0, EINVAL);
	want("write on the device", write(dev, &b, 1) < 0 ? errno : 0, EINVAL);
	want("read on a session fd", read(s, &b, 1) < 0 ? errno : 0, EINVAL);
	want("write on a session fd", write(s, &b, 1) < 0 ? errno : 0, EINVAL);
	close_settle(s);
}

/* ======================================= stage 1: CREATE / RETRIEVE (section 4) =================== */
static void create_ok_struct_and_fd(void)
{
	create_t c = named("cerr-create");
	want("CREATE", call(dev, CREATE, &c), 0);
	check("size echoed", c.size, sizeof(c));
	check("name echoed", memcmp(c.name, named("cerr-create").name, sizeof(c.name)), 0);
	if (c.fd < 0 || !fd_is_cloexec_rdwr(c.fd))
		fail("CREATE: fd %d is not an O_RDWR, close-on-exec descriptor", c.fd);
	if (c.fd >= 0)
		close_settle(c.fd);
}

static void create_emfile_first(void)
{
	create_t c = named("cerr-emfile");
	no_free_fd();
	int e = call(dev, CREATE, &c);
	create_t bad = named("");  /* the fd reservation comes before the name check */
	int e2 = call(dev, CREATE, &bad);
	restore_fds();
	want("CREATE with no free fd", e, EMFILE);
	want("CREATE \"\" with no free fd", e2, EMFILE);
	int s = session(CREATE, "cerr-emfile");  /* nothing was created */
	if (s >= 0)
		close_settle(s);
}

static void create_empty_name(void)
{
	create_t c = named("");
	int e = call(dev, CREATE, &c);
	want("CREATE \"\"", e, v72 ? EINVAL : 0);
	if (!e)
		close_settle(c.fd);
}

static void create_no_nul_in_64(void)
{
	create_t c = { .size = sizeof(c), .fd = -1 };
	memset(c.name, 'X', sizeof(c.name));
	int e = call(dev, CREATE, &c);
	want("CREATE 64 x 'X'", e, v72 ? EINVAL : 0);
	if (!e) {  /* 6.19: cut to 63, so 63 x 'X' then 'Y' is the same name */
		create_t d = c;
		d.name[63] = 'Y';
		want("CREATE 63 x 'X' + 'Y' after the cut", call(dev, CREATE, &d), EEXIST);
		close_settle(c.fd);
	}
}

static void create_63_bytes_ok(void)
{
	create_t c = { .size = sizeof(c), .fd = -1 };
	memset(c.name, 'M', 63);
	want("CREATE 63 x 'M'", call(dev, CREATE, &c), 0);
	if (c.fd >= 0)
		close_settle(c.fd);
}

static void create_duplicate_eexist(void)
{
	int s = session(CREATE, "cerr-dup");
	create_t c = named("cerr-dup");
	want("CREATE a second \"cerr-dup\"", call(dev, CREATE, &c), EEXIST);
	if (s >= 0)
		close_settle(s);
	s = session(CREATE, "cerr-dup");  /* closing freed the name */
	if (s >= 0)
		close_settle(s);
}

static void create_session_cap_619_enomem(void)
{
	static int fds[900];
	int n = 0, e = 0;
	struct rlimit r;
	getrlimit(RLIMIT_NOFILE, &r);
	if (r.rlim_cur < 1024 && r.rlim_max >= 1024) {
		r.rlim_cur = 1024;
		setrlimit(RLIMIT_NOFILE, &r);
	}
	for (; n < 819; n++) {
		char name[32];
		snprintf(name, sizeof(name), "cerr-cap-%d", n);
		create_t c = named(name);
		if ((e = call(dev, CREATE, &c)))
			break;
		fds[n] = c.fd;
	}
	check("sessions created before the cap", n, 819);
	if (!e) {
		create_t c = named("cerr-cap-over");
		want("CREATE number 820", call(dev, CREATE, &c), ENOMEM);
	}
	for (int i = 0; i < n; i++)
		close(fds[i]);
	settle();
}

static void retrieve_before_update_enoent(void)
{
	create_t c = named("cerr-never-carried");
	want("RETRIEVE", call(dev, RETRIEVE, &c), ENOENT);
}

/* ======================================= stage 1: a session fd's dispatch (section 3) ============= */
static void sess_nr_out_of_range_einval(void)
{
	int s = session(CREATE, "cerr-nr-range");
	__u32 nrs[] = { 0x00, 0x01, 0x1B, 0x3F, v72 ? 0x44 : 0x43, 0xFF };  /* 6.19: GET_NAME is EINVAL */
	for (unsigned i = 0; s >= 0 && i < sizeof(nrs) / sizeof(nrs[0]); i++) {
		get_name_t g = { .size = sizeof(g) };
		char what[32];
		snprintf(what, sizeof(what), "nr %#x", nrs[i]);
		want(what, call(s, IO(nrs[i]), &g), EINVAL);
	}
	if (s >= 0)
		close_settle(s);
}

static void sess_size_unreadable_efault(void)
{
	int s = session(CREATE, "cerr-efault");
	if (s < 0)
		return;
	want("PRESERVE NULL", call(s, PRESERVE, NULL), EFAULT);
	if (v72)
		want("GET_NAME NULL", call(s, GET_NAME, NULL), EFAULT);
	close_settle(s);
}

static void sess_cmd_mismatch_enotty(void)
{
	int s = session(CREATE, "cerr-sess-enotty");
	int m = memfd("x", 0);
	preserve_t p = { .size = sizeof(p), .fd = m, .token = 1 };
	if (s >= 0) {
		want("cmd 0xab40", call(s, 0xAB40, &p), ENOTTY);
		want("_IOW PRESERVE", call(s, _IOW(LIVEUPDATE_IOCTL_TYPE, 0x40, preserve_t), &p), ENOTTY);
		close_settle(s);
	}
	close(m);
}

static void sess_size_below_min_einval(void)
{
	int s = session(CREATE, "cerr-sess-small");
	int m = memfd("x", 0);
	preserve_t p = { .size = 15, .fd = m, .token = 1 };
	if (s >= 0) {
		want("PRESERVE size 15", call(s, PRESERVE, &p), EINVAL);
		if (v72) {
			get_name_t g = { .size = 71 };
			want("GET_NAME size 71", call(s, GET_NAME, &g), EINVAL);
		}
		close_settle(s);
	}
	close(m);
}

static void sess_tail_e2big_zero_tail_ok(void)
{
	int s = session(CREATE, "cerr-sess-tail");
	int m = memfd("x", 0);
	struct { preserve_t p; unsigned char tail[8]; } big;
	memset(&big, 0, sizeof(big));
	big.p.size = sizeof(big);
	big.p.fd = m;
	big.p.token = 1;
	big.tail[4] = 9;
	if (s >= 0) {
		want("PRESERVE tail byte 20 = 9", call(s, PRESERVE, &big), E2BIG);
		big.tail[4] = 0;
		want("PRESERVE zero tail", call(s, PRESERVE, &big), 0);
		check("fd echoed", big.p.fd, m);
		check("token echoed", (long)big.p.token, 1);
		close_settle(s);
	}
	close(m);
}

/* RETRIEVE_FD and FINISH on an outgoing session: 7.2's kind check, before the size check. */
static void sess_kind_outgoing(void)
{
	int s = session(CREATE, "cerr-kind-out");
	if (s < 0)
		return;
	finish_t small = { .size = 2 };
	if (v72) {
		want("RETRIEVE_FD on outgoing", rfd(s, 7, NULL), EINVAL);
		want("FINISH on outgoing", fin(s, 0), EINVAL);
		want("FINISH size 2 on outgoing", call(s, FINISH, &small), EINVAL);
	} else {  /* the 6.19 choices of spec 12 */
		want("RETRIEVE_FD on outgoing", rfd(s, 7, NULL), ENOENT);
		want("FINISH on outgoing", fin(s, 0), 0);
	}
	close_settle(s);
}

/* ======================================= stage 1: PRESERVE_FD (section 5) ========================= */
static void preserve_token_eexist_first(void)
{
	int s = session(CREATE, "cerr-pres-token");
	int m = memfd("first", 0);
	if (s >= 0) {
		want("PRESERVE token 1", pres(s, m, 1), 0);
		want("PRESERVE fd -1, token 1", pres(s, -1, 1), EEXIST);
		want("PRESERVE the same memfd, token 1", pres(s, m, 1), EEXIST);
		close_settle(s);
	}
	close(m);
}

static void preserve_bad_fd_ebadf(void)
{
	int s = session(CREATE, "cerr-pres-ebadf");
	int opath = open("/proc/self/exe", O_PATH | O_CLOEXEC);
	if (s >= 0) {
		want("PRESERVE fd -1", pres(s, -1, 2), EBADF);
		want("PRESERVE fd 9999", pres(s, 9999, 2), EBADF);
		want("PRESERVE an O_PATH fd", pres(s, opath, 2), EBADF);
		close_settle(s);
	}
	close(opath);
}

static void preserve_not_a_memfd_enoent(void)
{
	int s = session(CREATE, "cerr-pres-enoent");
	int t = session(CREATE, "cerr-pres-enoent-2");
	int null = open("/dev/null", O_RDWR | O_CLOEXEC), p[2];
	if (pipe2(p, O_CLOEXEC))
		fail("pipe: %s", strerror(errno));
	if (s >= 0 && t >= 0) {
		want("PRESERVE /dev/null", pres(s, null, 2), ENOENT);
		want("PRESERVE a pipe", pres(s, p[0], 3), ENOENT);
		want("PRESERVE /dev/liveupdate", pres(s, dev, 4), ENOENT);
		want("PRESERVE another session fd", pres(s, t, 5), ENOENT);
		want("PRESERVE its own session fd", pres(s, s, 6), ENOENT);
	}
	close(null);
	close(p[0]);
	close(p[1]);
	if (t >= 0)
		close_settle(t);
	if (s >= 0)
		close_settle(s);
}

static void preserve_ok_size_0_token_0(void)
{
	int s = session(CREATE, "cerr-pres-ok");
	int m = memfd("", 0);
	preserve_t p = { .size = sizeof(p), .fd = m, .token = 0 };
	if (s >= 0) {
		want("PRESERVE an empty memfd, token 0", call(s, PRESERVE, &p), 0);
		check("size echoed", p.size, sizeof(p));
		check("fd echoed", p.fd, m);
		check("token echoed", (long)p.token, 0);
		close_settle(s);
	}
	close(m);
}

/* 7.2: one object is preserved once (keyed by inode: another token, session or open file); 6.19: 0. */
static void preserve_twice_ebusy(void)
{
	int a = session(CREATE, "cerr-dbl-a"), b = session(CREATE, "cerr-dbl-b");
	int m = memfd("twice", 0);
	char proc[64];
	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", m);
	int again = open(proc, O_RDWR | O_CLOEXEC);
	if (a >= 0 && b >= 0) {
		want("PRESERVE", pres(a, m, 1), 0);
		want("PRESERVE the memfd again, token 2", pres(a, m, 2), v72 ? EBUSY : 0);
		want("PRESERVE a re-open of it in another session", pres(b, again, 3), v72 ? EBUSY : 0);
		close_settle(a);
		a = -1;
		want("PRESERVE after its session closed", pres(b, m, 4), 0);
	}
	if (a >= 0)
		close_settle(a);
	if (b >= 0)
		close_settle(b);
	close(m);
	close(again);
}

static void preserve_file_cap_619_enospc(void)
{
	int s = session(CREATE, "cerr-files-cap");
	int fds[FILES_CAP_619 + 1], n = 0;
	for (; s >= 0 && n <= FILES_CAP_619; n++) {
		fds[n] = memfd("", 0);
		int e = pres(s, fds[n], n);
		if (n < FILES_CAP_619 && e) {
			want("PRESERVE below the cap", e, 0);
			n++;
			break;
		}
		if (n == FILES_CAP_619) {
			want("PRESERVE number 129", e, ENOSPC);
			want("PRESERVE number 129, a used token", pres(s, fds[n], 5), EEXIST);
		}
	}
	for (int i = 0; i < n; i++)
		close(fds[i]);
	if (s >= 0)
		close_settle(s);
}

/* Closing an outgoing session unpreserves its files and frees its name (section 7). */
static void close_outgoing_unpreserves(void)
{
	int s = session(CREATE, "cerr-unpres");
	int m = memfd("data", 0);
	char got[8] = { 0 };
	if (s >= 0) {
		want("PRESERVE", pres(s, m, 1), 0);
		close_settle(s);
		if (pread(m, got, 4, 0) != 4 || memcmp(got, "data", 4))
			fail("the memfd changed when its session closed");
		s = session(CREATE, "cerr-unpres");
		if (s >= 0) {
			want("PRESERVE it again in a new session of that name", pres(s, m, 1), 0);
			close_settle(s);
		}
	}
	close(m);
}

/* ======================================= stage 1: GET_NAME (7.2, section 5) ======================= */
static void get_name_reserved_einval(void)
{
	int s = session(CREATE, "cerr-gn-res");
	get_name_t g = { .size = sizeof(g), .reserved = 1 };
	if (s >= 0) {
		want("GET_NAME reserved 1", call(s, GET_NAME, &g), EINVAL);
		close_settle(s);
	}
}

/* strscpy writes whole 8-byte words: zeros up to the end of the NUL's word, the caller's bytes after. */
static void get_name_written_back(void)
{
	int s = session(CREATE, "cerr-abcde");  /* 10 bytes: the NUL is in the second word */
	get_name_t g = { .size = sizeof(g) };
	memset(g.name, 0xee, sizeof(g.name));
	unsigned char expect[64];
	memset(expect, 0xee, sizeof(expect));
	memcpy(expect, "cerr-abcde\0\0\0\0\0\0", 16);
	if (s >= 0) {
		want("GET_NAME", call(s, GET_NAME, &g), 0);
		check("name bytes as strscpy writes them", memcmp(g.name, expect, 64), 0);
		check("size echoed", g.size, sizeof(g));
		close_settle(s);
	}
	create_t c = { .size = sizeof(c), .fd = -1 };
	memset(c.name, 'x', 63);
	if (!call(dev, CREATE, &c)) {
		memset(g.name, 0xee, sizeof(g.name));
		want("GET_NAME of 63 bytes", call(c.fd, GET_NAME, &g), 0);
		check("63-byte name and its NUL", memcmp(g.name, c.name, 64), 0);
		close_settle(c.fd);
	}
}

/* ======================================= stage 1: what stage 2 retrieves ========================== */
static int held[16], nheld;

static void carry(const char *name, int files)
{
	static const char *data[] = { "payload", "one", "two" };
	int s = session(CREATE, name);
	for (int t = 1; s >= 0 && t <= files; t++) {
		int m = memfd(files == 1 ? data[0] : data[t], 0);
		int e = pres(s, m, files == 1 ? 7 : t);
		if (e)
			fail("carry %s: PRESERVE: %s", name, ename(e));
		close(m);
	}
	if (s >= 0)
		held[nheld++] = s;
}

static void stage1_carry(void)
{
	carry("cerr-rs", 1);
	carry("cerr-rs-emfile", 1);
	carry("cerr-kind-in", 1);
	carry("cerr-rfd", 2);
	carry("cerr-fin", 1);
	carry("cerr-same-name", 1);
	carry("cerr-empty", 0);
	carry("cerr-rs-ro", 1);
	carry("cerr-rfd-ro", 1);
	int s = session(CREATE, "cerr-released");  /* closed before the update: does not cross */
	if (s >= 0)
		close_settle(s);
}

/* ======================================= stage 2: on carried sessions ============================= */
static void retrieve_name_matching(void)
{
	create_t c = { .size = sizeof(c), .fd = -1 };
	memcpy(c.name, "cerr-rs", 7);
	memset(c.name + 7, 'Z', 57);
	want("RETRIEVE with no NUL in 64 bytes", call(dev, RETRIEVE, &c), ENOENT);
	c = named("cerr-rs");
	strcpy((char *)c.name + 8, "junk after the nul");
	want("RETRIEVE with bytes after the NUL", call(dev, RETRIEVE, &c), 0);
	check("name echoed", memcmp(c.name + 8, "junk after the nul", 18), 0);
	if (c.fd < 0 || !fd_is_cloexec_rdwr(c.fd))
		fail("RETRIEVE: fd %d is not an O_RDWR, close-on-exec descriptor", c.fd);
	else
		held[nheld++] = c.fd;  /* retrieve_twice_einval goes on with it */
}

static void retrieve_twice_einval(void)
{
	int s = nheld ? held[--nheld] : -1;
	create_t c = named("cerr-rs");
	want("RETRIEVE again", call(dev, RETRIEVE, &c), EINVAL);
	if (s < 0) {
		fail("no fd from the first RETRIEVE");
		return;
	}
	want("FINISH", fin(s, 0), 0);
	want("RETRIEVE after FINISH (listed until closed)", call(dev, RETRIEVE, &c), EINVAL);
	close_settle(s);
	want("RETRIEVE after close", call(dev, RETRIEVE, &c), ENOENT);
}

static void retrieve_session_emfile_first(void)
{
	create_t c = named("cerr-rs-emfile"), none = named("cerr-no-such");
	no_free_fd();
	int e = call(dev, RETRIEVE, &c), e2 = call(dev, RETRIEVE, &none);
	restore_fds();
	want("RETRIEVE with no free fd", e, EMFILE);
	want("RETRIEVE of no such name with no free fd", e2, EMFILE);
	int s = session(RETRIEVE, "cerr-rs-emfile");  /* not consumed by the failure */
	if (s >= 0)
		close_settle(s);
}

static void released_before_update_enoent(void)
{
	create_t c = named("cerr-released");
	want("RETRIEVE of a session closed before the update", call(dev, RETRIEVE, &c), ENOENT);
}

static void outgoing_may_reuse_incoming_name(void)
{
	int s = session(CREATE, "cerr-same-name");
	if (s >= 0)
		close_settle(s);
	s = session(RETRIEVE, "cerr-same-name");
	if (s >= 0)
		close_settle(s);
}

/* PRESERVE_FD on an incoming session: 7.2's kind check (before the size check); 6.19 accepts it. */
static void sess_kind_incoming(void)
{
	int s = session(RETRIEVE, "cerr-kind-in");
	int m = memfd("k", 0);
	preserve_t small = { .size = 3, .fd = m, .token = 1 };
	if (s >= 0) {
		want("PRESERVE on incoming", pres(s, m, 1), v72 ? EINVAL : 0);
		if (v72)
			want("PRESERVE size 3 on incoming", call(s, PRESERVE, &small), EINVAL);
		close_settle(s);
	}
	close(m);
}

static void retrieve_fd_rules(void)
{
	int s = session(RETRIEVE, "cerr-rfd"), a = -1, b = -1, out = -1;
	if (s < 0)
		return;
	want("RETRIEVE_FD token 99", rfd(s, 99, NULL), ENOENT);
	no_free_fd();
	int e = rfd(s, 1, NULL), e2 = rfd(s, 99, NULL);
	restore_fds();
	want("RETRIEVE_FD with no free fd", e, EMFILE);
	want("RETRIEVE_FD token 99 with no free fd", e2, EMFILE);
	retrieve_fd_t r = { .size = sizeof(r), .fd = -1, .token = 1 };
	want("RETRIEVE_FD token 1", call(s, RETRIEVE_FD, &r), 0);
	a = r.fd;
	check("size echoed", r.size, sizeof(r));
	check("token echoed", (long)r.token, 1);
	want("RETRIEVE_FD token 1 again", rfd(s, 1, &b), 0);
	char x[4] = { 0 }, y[4] = { 0 };
	if (a < 0 || b < 0 || a == b || read(a, x, 2) != 2 || read(b, y, 3) != 1 || memcmp(x, "on", 2) || y[0] != 'e')
		fail("the two retrieved fds do not share one open file of \"one\"");
	if (a >= 0 && !fd_is_cloexec_rdwr(a))
		fail("RETRIEVE_FD: fd %d is not an O_RDWR, close-on-exec descriptor", a);
	out = session(CREATE, "cerr-rfd-out");
	if (out >= 0)
		want("PRESERVE the retrieved memfd before FINISH", pres(out, a, 1), v72 ? EBUSY : 0);
	want("FINISH", fin(s, 0), 0);
	want("RETRIEVE_FD of an unretrieved token after FINISH", rfd(s, 2, NULL), ENOENT);
	if (a >= 0 && (pread(a, x, 3, 0) != 3 || memcmp(x, "one", 3)))
		fail("a retrieved memfd lost its data at FINISH");
	if (out >= 0) {
		if (v72)
			want("PRESERVE it after FINISH", pres(out, a, 1), 0);
		close_settle(out);
	}
	close(a);
	close(b);
	close_settle(s);
}

static void finish_rules(void)
{
	int s = session(RETRIEVE, "cerr-fin");
	if (s < 0)
		return;
	want("FINISH reserved 1", fin(s, 1), v72 ? EINVAL : 0);
	want("FINISH", fin(s, 0), 0);
	want("FINISH again (no files)", fin(s, 0), 0);
	want("RETRIEVE_FD after FINISH", rfd(s, 7, NULL), ENOENT);
	if (v72) {
		get_name_t g = { .size = sizeof(g) };
		want("GET_NAME after FINISH", call(s, GET_NAME, &g), 0);
		check("name", memcmp(g.name, "cerr-fin", 9), 0);
	}
	close_settle(s);
}

static void finish_empty_session(void)
{
	int s = session(RETRIEVE, "cerr-empty");
	if (s < 0)
		return;
	want("RETRIEVE_FD in an empty session", rfd(s, 0, NULL), ENOENT);
	want("FINISH on an empty session", fin(s, 0), 0);
	close_settle(s);
}

/* ================================================================================== the program === */
static void hold_and_exit(void)
{
	close(dev);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		exit(1);
	}
	if (pid > 0)
		return;
	setsid();
	int null = open("/dev/null", O_RDWR);
	dup2(null, 0);
	dup2(null, 1);
	dup2(null, 2);
	if (chdir("/"))
		_exit(1);
	/* Held until the kexec ends it, or until the sessions' server is gone (an emulator stopped after
	 * a failed stage: the FUSE or CUSE file then answers ENOTCONN or ENODEV, a live one EINVAL). */
	for (;;) {
		sleep(1);
		if (!nheld || (ioctl(held[0], IO(0x7f), NULL) < 0 && errno != EINVAL))
			_exit(0);
	}
}

int main(int argc, char **argv)
{
	const char *abi = NULL;
	int stage = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--abi"))
			abi = argv[i + 1];
		else if (!strcmp(argv[i], "--stage"))
			stage = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--device"))
			path = argv[i + 1];
	}
	if (!abi || (strcmp(abi, "6.19") && strcmp(abi, "7.2")) || (stage != 1 && stage != 2)) {
		fprintf(stderr, "usage: %s --abi 6.19|7.2 --stage 1|2 [--device PATH]\n", argv[0]);
		return 2;
	}
	v72 = !strcmp(abi, "7.2");
	dev = open(path, O_RDWR | O_CLOEXEC);
	if (dev < 0) {
		printf("FAIL open %s: %s\n", path, strerror(errno));
		return 1;
	}
#define ROW(fn) row(#fn, fn)
	if (stage == 1) {
		ROW(dev_nr_out_of_range_einval);
		ROW(dev_size_unreadable_efault);
		ROW(dev_cmd_mismatch_enotty);
		ROW(dev_size_below_min_einval);
		ROW(dev_tail_e2big_zero_tail_ok);
		ROW(dev_struct_fault_efault);
		ROW(create_copyout_fault_efault);
		ROW(dev_exclusive_open_ebusy);
		ROW(files_reopen_and_read_write);
		ROW(create_ok_struct_and_fd);
		ROW(create_emfile_first);
		ROW(create_empty_name);
		ROW(create_no_nul_in_64);
		ROW(create_63_bytes_ok);
		ROW(create_duplicate_eexist);
		if (!v72)  /* 7.2's cap is 510,000 sessions: the model tests check that number */
			ROW(create_session_cap_619_enomem);
		ROW(retrieve_before_update_enoent);
		ROW(sess_nr_out_of_range_einval);
		ROW(sess_size_unreadable_efault);
		ROW(sess_cmd_mismatch_enotty);
		ROW(sess_size_below_min_einval);
		ROW(sess_tail_e2big_zero_tail_ok);
		ROW(sess_kind_outgoing);
		ROW(preserve_token_eexist_first);
		ROW(preserve_bad_fd_ebadf);
		ROW(preserve_not_a_memfd_enoent);
		ROW(preserve_ok_size_0_token_0);
		ROW(preserve_twice_ebusy);
		if (!v72)  /* 7.2's cap is 630,000 files */
			ROW(preserve_file_cap_619_enospc);
		ROW(close_outgoing_unpreserves);
		if (v72) {
			ROW(get_name_reserved_einval);
			ROW(get_name_written_back);
		}
		ROW(stage1_carry);
	} else {
		ROW(retrieve_name_matching);
		ROW(retrieve_twice_einval);
		ROW(retrieve_session_emfile_first);
		ROW(retrieve_copyout_fault_efault);
		ROW(retrieve_fd_copyout_fault_efault);
		ROW(released_before_update_enoent);
		ROW(outgoing_may_reuse_incoming_name);
		ROW(sess_kind_incoming);
		ROW(retrieve_fd_rules);
		ROW(finish_rules);
		ROW(finish_empty_session);
	}
	printf("session_errno stage %d abi %s: %d rows, %d failed\n", stage, abi, rows, failed);
	if (stage == 1)
		hold_and_exit();
	else
		close(dev);
	return failed ? 1 : 0;
}
