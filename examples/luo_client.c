/*
 * luo_client: every /dev/liveupdate ioctl (LUO ABI v3), with its result printed.
 * Works the same against a real v3 kernel and against the cusedev emulator.
 *
 * Build:  gcc -O2 -Wall -I cdefs -o luo_client examples/luo_client.c
 *
 * Usage:  luo_client tour    [DEVICE]        every ioctl, success and error cases; leaves nothing behind
 *         luo_client prepare [DEVICE] TOKEN  preserve a 64 KiB memfd, PREPARE, then hold the device open
 *                                            until a line arrives on stdin (do the kexec meanwhile)
 *         luo_client restore [DEVICE] TOKEN  after the kexec: restore the memfd, verify it, FINISH
 *
 * With the emulator, run "restore" under `cusedev run` (FD_RESTORE must install an fd in this
 * process).  DEVICE defaults to /dev/liveupdate.  Output: one line per ioctl,
 *     NAME(args) = 0 [-> outputs]      or      NAME(args) = -1 ERRNO (message)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include "luo_v3.h"

#define LUO_IO(cmd) _IO(LIVEUPDATE_IOCTL_TYPE, cmd)
#define FD_PRESERVE LUO_IO(LIVEUPDATE_CMD_FD_PRESERVE)
#define FD_UNPRESERVE LUO_IO(LIVEUPDATE_CMD_FD_UNPRESERVE)
#define FD_RESTORE LUO_IO(LIVEUPDATE_CMD_FD_RESTORE)
#define GET_STATE LUO_IO(LIVEUPDATE_CMD_GET_STATE)
#define SET_EVENT LUO_IO(LIVEUPDATE_CMD_SET_EVENT)
#define GET_FD_STATE LUO_IO(LIVEUPDATE_CMD_GET_FD_STATE)
#define SET_FD_EVENT LUO_IO(LIVEUPDATE_CMD_SET_FD_EVENT)
#define RAM_SIZE (64 * 1024)

static const char *const state_names[] = {"undefined", "normal", "prepared", "frozen", "updated"};
static const char *const event_names[] = {"PREPARE", "FREEZE", "FINISH", "CANCEL"};

static const char *state_name(__u32 s) { return s < 5 ? state_names[s] : "?"; }
static const char *event_name(__u32 e) { return e < 4 ? event_names[e] : "?"; }

static const char *errname(int e)
{
	switch (e) {
	case EINVAL: return "EINVAL";
	case EBUSY: return "EBUSY";
	case ENOENT: return "ENOENT";
	case EEXIST: return "EEXIST";
	case EBADF: return "EBADF";
	case EFAULT: return "EFAULT";
	case ENOTTY: return "ENOTTY";
	case E2BIG: return "E2BIG";
	case ENODEV: return "ENODEV";
	case EMFILE: return "EMFILE";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	default: return "E?";
	}
}

/* ioctl + one result line; returns 0 or the errno */
static int call(int dev, unsigned long cmd, void *arg, const char *what)
{
	int r = ioctl(dev, cmd, arg);
	int err = r < 0 ? errno : 0;
	if (err)
		printf("%s = -1 %s (%s)\n", what, errname(err), strerror(err));
	else
		printf("%s = 0", what);
	return err;
}

static int get_state(int dev, __u32 *state)
{
	struct liveupdate_ioctl_get_state a = {.size = sizeof(a)};
	int err = call(dev, GET_STATE, &a, "GET_STATE()");
	if (!err) {
		printf(" -> %s\n", state_name(a.state));
		*state = a.state;
	}
	return err;
}

static int set_event(int dev, __u32 event)
{
	struct liveupdate_ioctl_set_event a = {.size = sizeof(a), .event = event};
	char what[64];
	snprintf(what, sizeof(what), "SET_EVENT(%s)", event_name(event));
	int err = call(dev, SET_EVENT, &a, what);
	if (!err)
		printf("\n");
	return err;
}

static int preserve(int dev, int fd, __u64 token)
{
	struct liveupdate_ioctl_fd_preserve a = {.size = sizeof(a), .fd = fd, .token = token};
	char what[64];
	snprintf(what, sizeof(what), "FD_PRESERVE(fd=%d, token=%#llx)", fd, (unsigned long long)token);
	int err = call(dev, FD_PRESERVE, &a, what);
	if (!err)
		printf("\n");
	return err;
}

static int unpreserve(int dev, __u64 token)
{
	struct liveupdate_ioctl_fd_unpreserve a = {.size = sizeof(a), .token = token};
	char what[64];
	snprintf(what, sizeof(what), "FD_UNPRESERVE(token=%#llx)", (unsigned long long)token);
	int err = call(dev, FD_UNPRESERVE, &a, what);
	if (!err)
		printf("\n");
	return err;
}

static int restore(int dev, __u64 token, int *fd)
{
	struct liveupdate_ioctl_fd_restore a = {.size = sizeof(a), .token = token};
	char what[64];
	snprintf(what, sizeof(what), "FD_RESTORE(token=%#llx)", (unsigned long long)token);
	int err = call(dev, FD_RESTORE, &a, what);
	if (!err) {
		printf(" -> fd %d\n", a.fd);
		*fd = a.fd;
	}
	return err;
}

static int fd_state(int dev, __u64 token, int incoming, __u32 *state)
{
	struct liveupdate_ioctl_get_fd_state a = {.size = sizeof(a), .incoming = incoming, .token = token};
	char what[80];
	snprintf(what, sizeof(what), "GET_FD_STATE(token=%#llx, incoming=%d)", (unsigned long long)token,
		 incoming);
	int err = call(dev, GET_FD_STATE, &a, what);
	if (!err) {
		printf(" -> %s\n", state_name(a.state));
		if (state)
			*state = a.state;
	}
	return err;
}

static int set_fd_event(int dev, __u64 token, __u32 event)
{
	struct liveupdate_ioctl_set_fd_event a = {.size = sizeof(a), .event = event, .token = token};
	char what[80];
	snprintf(what, sizeof(what), "SET_FD_EVENT(token=%#llx, %s)", (unsigned long long)token,
		 event_name(event));
	int err = call(dev, SET_FD_EVENT, &a, what);
	if (!err)
		printf("\n");
	return err;
}

static unsigned char pattern(size_t i, __u64 token) { return (unsigned char)(i * 31 + token); }

static int guest_ram(__u64 token)
{
	int fd = memfd_create("guest-ram", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, RAM_SIZE) < 0) {
		perror("memfd");
		exit(1);
	}
	unsigned char *p = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	for (size_t i = 0; i < RAM_SIZE; i++)
		p[i] = pattern(i, token);
	munmap(p, RAM_SIZE);
	return fd;
}

#define EXPECT(cond)                                                                                   \
	do {                                                                                           \
		if (!(cond)) {                                                                         \
			fprintf(stderr, "luo_client: unexpected result at line %d: %s\n", __LINE__, #cond); \
			failures++;                                                                    \
		}                                                                                      \
	} while (0)

static int failures;

static int tour(int dev)
{
	const __u64 tok = 0x1001;
	__u32 st = 0;
	int fd = guest_ram(tok), rfd = -1;

	EXPECT(get_state(dev, &st) == 0 && st == LIVEUPDATE_STATE_NORMAL);
	EXPECT(preserve(dev, fd, tok) == 0);
	EXPECT(preserve(dev, fd, tok) == EEXIST);           /* tokens are unique */
	EXPECT(preserve(dev, 9999, 0x2002) == EBADF);       /* not an open fd */
	EXPECT(fd_state(dev, tok, 0, &st) == 0 && st == LIVEUPDATE_STATE_NORMAL);
	EXPECT(fd_state(dev, tok, 1, NULL) == ENOENT);      /* no incoming set before a live update */
	EXPECT(set_fd_event(dev, tok, LIVEUPDATE_PREPARE) == 0);
	EXPECT(fd_state(dev, tok, 0, &st) == 0 && st == LIVEUPDATE_STATE_PREPARED);
	EXPECT(set_fd_event(dev, tok, LIVEUPDATE_CANCEL) == 0);
	EXPECT(set_fd_event(dev, tok, LIVEUPDATE_FINISH) == EBUSY); /* FINISH only after an update */
	EXPECT(unpreserve(dev, tok) == 0);
	EXPECT(unpreserve(dev, tok) == ENOENT);
	EXPECT(restore(dev, tok, &rfd) == EBUSY);           /* restore only after an update */
	EXPECT(preserve(dev, fd, tok) == 0);
	EXPECT(set_event(dev, LIVEUPDATE_FREEZE) == EINVAL); /* freezing is reboot()'s job */
	EXPECT(set_event(dev, LIVEUPDATE_PREPARE) == 0);
	EXPECT(get_state(dev, &st) == 0 && st == LIVEUPDATE_STATE_PREPARED);
	EXPECT(fd_state(dev, tok, 0, &st) == 0 && st == LIVEUPDATE_STATE_PREPARED);
	EXPECT(preserve(dev, fd, 0x3003) == EBUSY);         /* no new files while prepared */
	EXPECT(set_event(dev, LIVEUPDATE_CANCEL) == 0);
	EXPECT(get_state(dev, &st) == 0 && st == LIVEUPDATE_STATE_NORMAL);
	EXPECT(set_event(dev, LIVEUPDATE_FINISH) == EINVAL);
	struct liveupdate_ioctl_get_state bad = {.size = 4}; /* below min_size */
	EXPECT(call(dev, GET_STATE, &bad, "GET_STATE(size=4)") == EINVAL);
	EXPECT(call(dev, LUO_IO(7), &bad, "ioctl(nr=7)") == EINVAL);
	close(fd);
	return 0;
}

static int prepare(int dev, __u64 token)
{
	__u32 st = 0;
	int fd = guest_ram(token);
	EXPECT(preserve(dev, fd, token) == 0);
	EXPECT(set_event(dev, LIVEUPDATE_PREPARE) == 0);
	EXPECT(get_state(dev, &st) == 0 && st == LIVEUPDATE_STATE_PREPARED);
	printf("prepared: holding %s open until the kexec (press enter)\n", "the device");
	fflush(stdout);
	char line[16];
	if (!fgets(line, sizeof(line), stdin))
		line[0] = 0;
	/* on a real kernel this process would be gone; the emulator revokes the handle instead */
	get_state(dev, &st);
	return 0;
}

static int restore_and_finish(int dev, __u64 token)
{
	__u32 st = 0;
	int fd = -1;
	EXPECT(get_state(dev, &st) == 0 && st == LIVEUPDATE_STATE_UPDATED);
	EXPECT(fd_state(dev, token, 1, &st) == 0 && st == LIVEUPDATE_STATE_UPDATED);
	EXPECT(restore(dev, token, &fd) == 0);
	EXPECT(restore(dev, token, &fd) == EINVAL || fd < 0); /* single use */
	if (fd >= 0) {
		unsigned char *p = mmap(NULL, RAM_SIZE, PROT_READ, MAP_SHARED, fd, 0);
		size_t bad = 0;
		if (p == MAP_FAILED) {
			perror("mmap restored");
			return 1;
		}
		for (size_t i = 0; i < RAM_SIZE; i++)
			bad += p[i] != pattern(i, token);
		munmap(p, RAM_SIZE);
		int cloexec = (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
		printf("restored fd %d: %zu of %d bytes differ, %s\n", fd, bad, RAM_SIZE,
		       cloexec ? "O_CLOEXEC" : "no O_CLOEXEC");
		EXPECT(bad == 0 && cloexec);
	}
	EXPECT(set_fd_event(dev, token, LIVEUPDATE_FINISH) == 0);
	EXPECT(fd_state(dev, token, 1, &st) == 0 && st == LIVEUPDATE_STATE_NORMAL);
	EXPECT(set_event(dev, LIVEUPDATE_FINISH) == 0);
	EXPECT(get_state(dev, &st) == 0 && st == LIVEUPDATE_STATE_NORMAL);
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "tour";
	const char *path = "/dev/liveupdate";
	const char *token_arg = NULL;
	if (argc > 2 && argv[2][0] == '/')
		path = argv[2], token_arg = argc > 3 ? argv[3] : NULL;
	else
		token_arg = argc > 2 ? argv[2] : NULL;
	__u64 token = token_arg ? strtoull(token_arg, NULL, 0) : 0x1001;

	setvbuf(stdout, NULL, _IOLBF, 0);
	int dev = open(path, O_RDWR | O_CLOEXEC);
	if (dev < 0) {
		fprintf(stderr, "luo_client: %s: %s\n", path, strerror(errno));
		return 1;
	}
	printf("open(%s) = %d\n", path, dev);
	if (!strcmp(mode, "tour"))
		tour(dev);
	else if (!strcmp(mode, "prepare"))
		prepare(dev, token);
	else if (!strcmp(mode, "restore"))
		restore_and_finish(dev, token);
	else {
		fprintf(stderr, "usage: luo_client tour|prepare|restore [DEVICE] [TOKEN]\n");
		return 2;
	}
	close(dev);
	printf("%s: %s\n", mode, failures ? "UNEXPECTED RESULTS" : "ok");
	return failures ? 1 : 0;
}
