/*
 * cusedev benchmark client for the session ABI (profiles 6.19/7.2), run under
 * `cusedev run` (CREATE_SESSION, RETRIEVE_SESSION and RETRIEVE_FD return fds).
 *
 *   lat DEV get_name|preserve|create N   latency of N calls after 10% warm-up
 *     get_name: GET_NAME on one session fd (a plain round trip, nothing trapped)
 *     preserve: PRESERVE_FD of a fresh 4 KiB memfd per call into one session
 *               (N distinct memfds made before the timer: a file is preserved once)
 *     create:   CREATE_SESSION of a new name per call (trapped, an fd installed);
 *               the session fds stay open so no release runs during the loop
 *   lat DEV retrieve_fd N NAME           the same, of RETRIEVE_FD after a live update: the incoming
 *                                        session NAME (made by `rfd-hold`, then kexec) is retrieved
 *                                        untimed, then tokens 1.. are retrieved once each (every call
 *                                        a first retrieval: trapped, the file rebuilt, an fd
 *                                        installed); the fds stay open; FINISH after the timer
 *   rfd-hold DEV NAME N                  the session NAME of the memfds `lat retrieve_fd N` retrieves
 *                                        (its warm-up and N timed calls: 4 KiB each), then wait on stdin
 *   hold DEV SESSIONS FILES KIB          SESSIONS sessions of FILES memfds each, then wait on stdin
 *   restore DEV SESSIONS FILES           RETRIEVE_SESSION + RETRIEVE_FD of everything, FINISH;
 *                                        RETRIEVE_FD latency (median/p99) of every call
 * One JSON line on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include "luo_session.h"

#define IO(cmd) _IO(LIVEUPDATE_IOCTL_TYPE, cmd)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "bench session client: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void raise_nofile(void)
{
	struct rlimit r;
	if (getrlimit(RLIMIT_NOFILE, &r) == 0) {
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
}

static int open_dev(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(path);
	return fd;
}

static int session(int dev, unsigned long cmd, const char *name)
{
	struct liveupdate_ioctl_create_session c = { .size = sizeof(c), .fd = -1 };
	snprintf((char *)c.name, sizeof(c.name), "%s", name);
	if (ioctl(dev, cmd, &c))
		die(cmd == IO(LIVEUPDATE_CMD_CREATE_SESSION) ? "CREATE_SESSION" : "RETRIEVE_SESSION");
	return c.fd;
}

static void get_name(int s)
{
	struct liveupdate_session_get_name g = { .size = sizeof(g) };
	if (ioctl(s, IO(LIVEUPDATE_CMD_SESSION_GET_NAME), &g))
		die("GET_NAME");
}

static void preserve(int s, int fd, __u64 token)
{
	struct liveupdate_session_preserve_fd p = { .size = sizeof(p), .fd = fd, .token = token };
	if (ioctl(s, IO(LIVEUPDATE_CMD_SESSION_PRESERVE_FD), &p))
		die("PRESERVE_FD");
}

static int make_memfd(size_t bytes, int alloc)
{
	int fd = memfd_create("bench", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, bytes))
		die("memfd");
	if (alloc && bytes && fallocate(fd, 0, 0, bytes))
		die("fallocate");
	return fd;
}

/* the untimed calls before a `lat` loop: 10% + 1 */
static long warmup(long n)
{
	return n / 10 + 1;
}

static void report(const char *op, double *s, long n, double total)
{
	qsort(s, n, sizeof(double), cmp_double);
	printf("{\"op\": \"%s\", \"n\": %ld, \"median_us\": %.2f, \"p99_us\": %.2f, \"min_us\": %.2f, "
	       "\"ioctls_per_s\": %.0f, \"seconds\": %.3f}\n",
	       op, n, s[n / 2] * 1e6, s[(long)(n * 0.99)] * 1e6, s[0] * 1e6, n / total, total);
}

static int retrieve_fd(int s, __u64 token)
{
	struct liveupdate_session_retrieve_fd r = { .size = sizeof(r), .fd = -1, .token = token };
	if (ioctl(s, IO(LIVEUPDATE_CMD_SESSION_RETRIEVE_FD), &r))
		die("RETRIEVE_FD");
	return r.fd;
}

static void finish(int s)
{
	struct liveupdate_session_finish f = { .size = sizeof(f) };
	if (ioctl(s, IO(LIVEUPDATE_CMD_SESSION_FINISH), &f))
		die("FINISH");
}

static int mode_lat(const char *path, const char *op, long n, const char *rfd_name)
{
	raise_nofile();
	int dev = open_dev(path);
	int kind = !strcmp(op, "get_name") ? 0 : !strcmp(op, "preserve") ? 1 : !strcmp(op, "create") ? 2
		 : !strcmp(op, "retrieve_fd") ? 3 : -1;
	if (kind < 0 || (kind == 3 && !rfd_name)) {
		fprintf(stderr, "bench session client: unknown op %s (retrieve_fd needs NAME)\n", op);
		return 2;
	}
	long warm = warmup(n), total_n = n + warm;
	char name[48];
	snprintf(name, sizeof(name), "bench-%d", (int)getpid());  /* unique: a previous run's release may lag */
	int s = kind == 2 ? -1 : kind == 3 ? session(dev, IO(LIVEUPDATE_CMD_RETRIEVE_SESSION), rfd_name)
		: session(dev, IO(LIVEUPDATE_CMD_CREATE_SESSION), name);
	int *mfds = NULL;
	if (kind == 1 || kind == 3)
		mfds = malloc(sizeof(int) * total_n);
	if (kind == 1) {
		for (long i = 0; i < total_n; i++)
			mfds[i] = make_memfd(4096, 1);
	}
	double *t = malloc(sizeof(double) * n), t_start = 0;
	for (long i = -warm; i < n; i++) {
		if (kind == 2)
			snprintf(name, sizeof(name), "b%d-%ld", (int)getpid(), i + warm);
		if (i == 0)
			t_start = now();
		double t0 = now();
		switch (kind) {
		case 0:
			get_name(s);
			break;
		case 1:
			preserve(s, mfds[i + warm], (__u64)(i + warm));
			break;
		case 2:
			session(dev, IO(LIVEUPDATE_CMD_CREATE_SESSION), name);
			break;
		case 3:  /* tokens 1..warm untimed, then the timed ones; the fds stay open */
			mfds[i + warm] = retrieve_fd(s, (__u64)(i + warm) + 1);
			break;
		}
		if (i >= 0)
			t[i] = now() - t0;
	}
	double total = now() - t_start;
	if (kind == 3) {  /* what came back is what was preserved: a 4 KiB memfd (a wrong file fails the row) */
		struct stat st;
		if (fstat(mfds[total_n - 1], &st))
			die("fstat");
		if (st.st_size != 4096) {
			fprintf(stderr, "bench session client: retrieved size %lld != 4096\n", (long long)st.st_size);
			return 1;
		}
		finish(s);
	}
	report(op, t, n, total);
	return 0;
}

static int mode_rfd_hold(const char *path, const char *name, long n)
{
	raise_nofile();
	int dev = open_dev(path);
	long total_n = n + warmup(n);
	int s = session(dev, IO(LIVEUPDATE_CMD_CREATE_SESSION), name);
	for (long i = 0; i < total_n; i++) {
		int m = make_memfd(4096, 1);
		preserve(s, m, (__u64)i + 1);
		close(m);  /* the session holds the file */
	}
	printf("{\"name\": \"%s\", \"files\": %ld}\n", name, total_n);
	fflush(stdout);
	char c;
	while (read(0, &c, 1) > 0)
		;
	return 0;
}

static int mode_hold(const char *path, long sessions, long files, long kib, int alloc)
{
	raise_nofile();
	int dev = open_dev(path);
	size_t bytes = (size_t)kib << 10;
	char name[32];
	double t0 = now();
	for (long i = 0; i < sessions; i++) {
		snprintf(name, sizeof(name), "s%ld", i);
		int s = session(dev, IO(LIVEUPDATE_CMD_CREATE_SESSION), name);
		for (long j = 0; j < files; j++) {
			int m = make_memfd(bytes, alloc);
			preserve(s, m, (__u64)j + 1);
			close(m);  /* the session holds the file */
		}
	}
	printf("{\"sessions\": %ld, \"files\": %ld, \"kib\": %ld, \"hold_s\": %.6f}\n",
	       sessions, files, kib, now() - t0);
	fflush(stdout);
	char c;
	while (read(0, &c, 1) > 0)
		;
	return 0;
}

static int mode_restore(const char *path, long sessions, long files)
{
	raise_nofile();
	int dev = open_dev(path);
	char name[32];
	long n = sessions * files, k = 0;
	double *t = malloc(sizeof(double) * n), sess_s = 0, fin_s = 0;
	off_t size = -1;
	double t_start = now();
	for (long i = 0; i < sessions; i++) {
		snprintf(name, sizeof(name), "s%ld", i);
		double a = now();
		int s = session(dev, IO(LIVEUPDATE_CMD_RETRIEVE_SESSION), name);
		sess_s += now() - a;
		for (long j = 0; j < files; j++) {
			double t0 = now();
			int fd = retrieve_fd(s, (__u64)j + 1);
			t[k++] = now() - t0;
			if (size < 0) {
				struct stat st;
				if (fstat(fd, &st))
					die("fstat");
				size = st.st_size;
			}
			close(fd);
		}
		a = now();
		finish(s);
		fin_s += now() - a;
		close(s);
	}
	double total = now() - t_start;
	qsort(t, n, sizeof(double), cmp_double);
	printf("{\"sessions\": %ld, \"files\": %ld, \"restore_s\": %.6f, \"retrieve_session_s\": %.6f, "
	       "\"finish_s\": %.6f, \"retrieve_fd_median_us\": %.2f, \"retrieve_fd_p99_us\": %.2f, \"size\": %lld}\n",
	       sessions, files, total, sess_s, fin_s, t[n / 2] * 1e6, t[(long)(n * 0.99)] * 1e6, (long long)size);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 5 && !strcmp(argv[1], "lat"))
		return mode_lat(argv[2], argv[3], atol(argv[4]), argc >= 6 ? argv[5] : NULL);
	if (argc >= 5 && !strcmp(argv[1], "rfd-hold"))
		return mode_rfd_hold(argv[2], argv[3], atol(argv[4]));
	if (argc >= 6 && !strcmp(argv[1], "hold"))
		return mode_hold(argv[2], atol(argv[3]), atol(argv[4]), atol(argv[5]), argc >= 7 && atoi(argv[6]));
	if (argc >= 5 && !strcmp(argv[1], "restore"))
		return mode_restore(argv[2], atol(argv[3]), atol(argv[4]));
	fprintf(stderr, "usage: session_client lat DEV get_name|preserve|create N | lat DEV retrieve_fd N NAME | "
			"rfd-hold DEV NAME N | hold DEV SESSIONS FILES KIB [ALLOC] | restore DEV SESSIONS FILES\n");
	return 2;
}
