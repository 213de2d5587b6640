/*
 * The floor of a trapped fd-returning ioctl: what the kernel charges any
 * userspace emulator that installs an fd with seccomp user notification.
 *
 *   seccomp_floor N plain|pvm [SERVER_CPU]
 *
 * A child installs a filter that sends ioctl(_, CREATE_SESSION, _) to a
 * listener and calls it N times (after 10% warm-up) on /dev/null with a
 * struct liveupdate_ioctl_create_session (72 bytes), timing each call.  The
 * parent, the supervisor, answers each notification the way `cusedev run`'s
 * emulator does, and nothing more:
 *   plain: SECCOMP_IOCTL_NOTIF_ADDFD of one fd of its own, SECCOMP_IOCTL_NOTIF_SEND
 *          with the new fd number as the result;
 *   pvm:   process_vm_readv of the caller's struct, ADDFD, process_vm_writev
 *          of the struct with the fd number, NOTIF_SEND (result 0).
 * No checks beyond the syscalls' results.  The installed fds stay open in the
 * child (as the CREATE_SESSION benchmark's session fds do), so no close runs
 * in the loop.  Placement is inherited (taskset / sched_setaffinity before
 * exec); SERVER_CPU moves the supervisor alone to that CPU (the "split" case).
 * One JSON line on stdout, like bench/session_client.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/ioctl.h>
#include <linux/seccomp.h>
#include <linux/types.h>
#include "luo_session.h"

#define CMD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)

static void die(const char *what)
{
	fprintf(stderr, "seccomp_floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* The filter: x86_64 ioctl with cmd == CMD goes to the listener; everything else runs. */
static int install_filter(void)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 4),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 2),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, CMD, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
	};
	struct sock_fprog prog = { .len = sizeof(f) / sizeof(f[0]), .filter = f };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		die("PR_SET_NO_NEW_PRIVS");
	int fd = syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (fd < 0)
		die("seccomp");
	return fd;
}

static void send_fd(int sock, int fd)
{
	char b = 'L';
	struct iovec iov = { &b, 1 };
	union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	if (sendmsg(sock, &m, 0) != 1)
		die("sendmsg");
}

static int recv_fd(int sock)
{
	char b;
	struct iovec iov = { &b, 1 };
	union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
	if (recvmsg(sock, &m, 0) != 1)
		die("recvmsg");
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	int fd;
	if (!c || c->cmsg_type != SCM_RIGHTS)
		die("no listener");
	memcpy(&fd, CMSG_DATA(c), sizeof(int));
	return fd;
}

/* The client: N timed trapped calls; one JSON line. */
static int client(int sock, long n)
{
	struct rlimit r;
	if (getrlimit(RLIMIT_NOFILE, &r) == 0) {  /* the installed fds stay open */
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
	int dev = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		die("/dev/null");
	int listener = install_filter();
	send_fd(sock, listener);
	close(listener);
	long warm = n / 10 + 1;
	double *t = malloc(sizeof(double) * n), t_start = 0;
	for (long i = -warm; i < n; i++) {
		struct liveupdate_ioctl_create_session c = { .size = sizeof(c), .fd = -1 };
		if (i == 0)
			t_start = now();
		double t0 = now();
		long res = ioctl(dev, CMD, &c);
		double dt = now() - t0;
		if (res < 0)
			die("trapped ioctl");
		if (i >= 0)
			t[i] = dt;
	}
	double total = now() - t_start;
	qsort(t, n, sizeof(double), cmp_double);
	printf("{\"op\": \"seccomp_addfd\", \"n\": %ld, \"median_us\": %.2f, \"p99_us\": %.2f, \"min_us\": %.2f, "
	       "\"ioctls_per_s\": %.0f, \"seconds\": %.3f}\n",
	       n, t[n / 2] * 1e6, t[(long)(n * 0.99)] * 1e6, t[0] * 1e6, n / total, total);
	fflush(stdout);
	return 0;
}

/* The supervisor: answer every notification until the child is gone. */
static void supervise(int listener, int pvm)
{
	int ours = open("/dev/null", O_RDWR | O_CLOEXEC);  /* the fd handed out each time */
	if (ours < 0)
		die("/dev/null");
	struct seccomp_notif req;
	struct seccomp_notif_resp resp;
	struct liveupdate_ioctl_create_session buf;
	struct pollfd p = { .fd = listener, .events = POLLIN };
	for (;;) {
		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (!(p.revents & POLLIN))
			return;  /* POLLHUP: the filtered child is gone */
		memset(&req, 0, sizeof(req));
		if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req)) {
			if (errno == ENOENT || errno == EINTR)
				continue;
			die("NOTIF_RECV");
		}
		struct iovec local = { &buf, sizeof(buf) }, remote = { (void *)req.data.args[2], sizeof(buf) };
		if (pvm && process_vm_readv(req.pid, &local, 1, &remote, 1, 0) != sizeof(buf))
			die("process_vm_readv");
		struct seccomp_notif_addfd a = { .id = req.id, .srcfd = ours, .newfd_flags = O_CLOEXEC };
		int newfd = ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &a);
		if (newfd < 0)
			die("NOTIF_ADDFD");
		if (pvm) {
			buf.fd = newfd;
			if (process_vm_writev(req.pid, &local, 1, &remote, 1, 0) != sizeof(buf))
				die("process_vm_writev");
		}
		memset(&resp, 0, sizeof(resp));
		resp.id = req.id;
		resp.val = pvm ? 0 : newfd;
		if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) && errno != ENOENT)
			die("NOTIF_SEND");
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 3 || atol(argv[1]) <= 0 || (strcmp(argv[2], "plain") && strcmp(argv[2], "pvm"))) {
		fprintf(stderr, "usage: seccomp_floor N plain|pvm [SERVER_CPU]\n");
		return 2;
	}
	long n = atol(argv[1]);
	int pvm = !strcmp(argv[2], "pvm");
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv))
		die("socketpair");
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		close(sv[0]);
		return client(sv[1], n);
	}
	close(sv[1]);
	if (argc >= 4) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(atoi(argv[3]), &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			die("sched_setaffinity");
	}
	int listener = recv_fd(sv[0]);
	close(sv[0]);
	supervise(listener, pvm);
	int status;
	if (waitpid(pid, &status, 0) < 0)
		die("waitpid");
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
