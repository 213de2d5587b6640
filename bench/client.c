/*
 * Benchmark client for /dev/liveupdate (LUO ABI v3): the C side of bench/run.
 *
 * Every mode prints one JSON object on stdout, so the runner never parses
 * free text.  Timing uses CLOCK_MONOTONIC around each ioctl (or pair).
 *
 *   client lat DEV OP N        OP = get_state | preserve | event; N timed iterations
 *                              (after N/10 warm-up).  preserve = FD_PRESERVE +
 *                              FD_UNPRESERVE of one memfd, event = SET_EVENT
 *                              PREPARE + CANCEL; latency is per iteration; also
 *                              the CPU the client ran most iterations on, and
 *                              (client lat DEV OP N PID) the one server PID last ran on.
 *   client loop DEV N          N GET_STATE calls, no per-call samples (RSS runs).
 *   client hold DEV COUNT KIB  preserve COUNT memfds of KIB KiB each (pages
 *                              allocated), PREPARE, print timings, then wait
 *                              for stdin to close (the runner kexecs meanwhile).
 *   client restore DEV COUNT   FD_RESTORE tokens 1..COUNT (under `cusedev run`),
 *                              check sizes, FINISH; print timings.
 *
 * Build: gcc -O2 -Wall -I cdefs -o client bench/client.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <stdint.h>
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
#include "luo_v3.h"

#define MAX_CPUS 256
#define LUO_IO(cmd) _IO(LIVEUPDATE_IOCTL_TYPE, cmd)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "bench client: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static int open_dev(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(path);
	return fd;
}

static void raise_nofile(void)
{
	struct rlimit r;
	if (getrlimit(RLIMIT_NOFILE, &r) == 0) {
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
}

static void get_state(int dev)
{
	struct liveupdate_ioctl_get_state gs = { .size = sizeof(gs) };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_GET_STATE), &gs))
		die("GET_STATE");
}

static void preserve(int dev, int fd, __u64 token)
{
	struct liveupdate_ioctl_fd_preserve p = { .size = sizeof(p), .fd = fd, .token = token };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_FD_PRESERVE), &p))
		die("FD_PRESERVE");
}

static void unpreserve(int dev, __u64 token)
{
	struct liveupdate_ioctl_fd_unpreserve u = { .size = sizeof(u), .token = token };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_FD_UNPRESERVE), &u))
		die("FD_UNPRESERVE");
}

static void set_event(int dev, __u32 event)
{
	struct liveupdate_ioctl_set_event ev = { .size = sizeof(ev), .event = event };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_SET_EVENT), &ev))
		die("SET_EVENT");
}

static int make_memfd(size_t bytes)
{
	int fd = memfd_create("bench", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, bytes))
		die("memfd");
	/* real pages, so that a copy anywhere would show in the timings */
	if (bytes && fallocate(fd, 0, 0, bytes))
		die("fallocate");
	return fd;
}

/* The CPU thread `pid` last ran on (field 39 of /proc/PID/stat), -1 if unknown. */
static int last_cpu(long pid)
{
	char buf[1024], name[64];
	snprintf(name, sizeof(name), "/proc/%ld/stat", pid);
	FILE *f = fopen(name, "r");
	if (!f)
		return -1;
	size_t len = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[len] = 0;
	char *p = strrchr(buf, ')');
	int field = 2;
	while (p && field < 39) {
		p = strchr(p + 1, ' ');
		field++;
	}
	return p ? atoi(p + 1) : -1;
}

static int mode_lat(const char *path, const char *op, long n, long server_pid)
{
	int dev = open_dev(path);
	int kind = !strcmp(op, "get_state") ? 0 : !strcmp(op, "preserve") ? 1 : !strcmp(op, "event") ? 2 : -1;
	if (kind < 0) {
		fprintf(stderr, "bench client: unknown op %s\n", op);
		return 2;
	}
	int mfd = kind == 1 ? make_memfd(4096) : -1;
	double *s = malloc(sizeof(double) * n);
	long on_cpu[MAX_CPUS] = { 0 };  /* where the client ran (free placement: with the server or not) */
	if (!s)
		die("malloc");
	long warm = n / 10 + 1;
	double t_start = 0;
	for (long i = -warm; i < n; i++) {
		if (i == 0)
			t_start = now();
		double t0 = now();
		switch (kind) {
		case 0:
			get_state(dev);
			break;
		case 1:
			preserve(dev, mfd, 1);
			unpreserve(dev, 1);
			break;
		case 2:
			set_event(dev, LIVEUPDATE_PREPARE);
			set_event(dev, LIVEUPDATE_CANCEL);
			break;
		}
		if (i >= 0) {
			s[i] = now() - t0;
			int c = sched_getcpu();
			if (c >= 0 && c < MAX_CPUS)
				on_cpu[c]++;
		}
	}
	double total = now() - t_start;
	/* read before closing the device: where the server answered the last calls */
	int server_cpu = server_pid > 0 ? last_cpu(server_pid) : -1;
	int cpu = 0;
	for (int c = 1; c < MAX_CPUS; c++)
		if (on_cpu[c] > on_cpu[cpu])
			cpu = c;
	qsort(s, n, sizeof(double), cmp_double);
	int per = kind == 0 ? 1 : 2;
	printf("{\"op\": \"%s\", \"n\": %ld, \"ioctls_per_iter\": %d, \"median_us\": %.2f, "
	       "\"p99_us\": %.2f, \"min_us\": %.2f, \"ioctls_per_s\": %.0f, \"seconds\": %.3f, "
	       "\"cpu\": %d, \"cpu_share\": %.3f, \"server_cpu\": %d}\n",
	       op, n, per, s[n / 2] * 1e6, s[(long)(n * 0.99)] * 1e6, s[0] * 1e6, n * per / total, total,
	       cpu, (double)on_cpu[cpu] / n, server_cpu);
	return 0;
}

static int mode_loop(const char *path, long n)
{
	int dev = open_dev(path);
	double t0 = now();
	for (long i = 0; i < n; i++)
		get_state(dev);
	double dt = now() - t0;
	printf("{\"n\": %ld, \"seconds\": %.3f, \"ioctls_per_s\": %.0f}\n", n, dt, n / dt);
	return 0;
}

static int mode_hold(const char *path, long count, long kib)
{
	raise_nofile();
	int dev = open_dev(path);
	size_t bytes = (size_t)kib << 10;
	int *fds = malloc(sizeof(int) * count);
	for (long i = 0; i < count; i++)
		fds[i] = make_memfd(bytes);
	double t0 = now();
	for (long i = 0; i < count; i++)
		preserve(dev, fds[i], i + 1);
	double t1 = now();
	set_event(dev, LIVEUPDATE_PREPARE);
	double t2 = now();
	printf("{\"count\": %ld, \"kib\": %ld, \"preserve_s\": %.6f, \"prepare_s\": %.6f}\n",
	       count, kib, t1 - t0, t2 - t1);
	fflush(stdout);
	char c;
	while (read(0, &c, 1) > 0)
		;
	return 0;
}

static int mode_restore(const char *path, long count)
{
	raise_nofile();
	int dev = open_dev(path);
	off_t size = -1;
	double t0 = now();
	for (long i = 0; i < count; i++) {
		struct liveupdate_ioctl_fd_restore r = { .size = sizeof(r), .token = i + 1 };
		if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_FD_RESTORE), &r))
			die("FD_RESTORE");
		if (i == 0) {
			struct stat st;
			if (fstat(r.fd, &st))
				die("fstat");
			size = st.st_size;
		}
	}
	double t1 = now();
	set_event(dev, LIVEUPDATE_FINISH);
	double t2 = now();
	printf("{\"count\": %ld, \"restore_s\": %.6f, \"finish_s\": %.6f, \"size\": %lld}\n",
	       count, t1 - t0, t2 - t1, (long long)size);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 5 && !strcmp(argv[1], "lat"))
		return mode_lat(argv[2], argv[3], atol(argv[4]), argc >= 6 ? atol(argv[5]) : 0);
	if (argc >= 4 && !strcmp(argv[1], "loop"))
		return mode_loop(argv[2], atol(argv[3]));
	if (argc >= 5 && !strcmp(argv[1], "hold"))
		return mode_hold(argv[2], atol(argv[3]), atol(argv[4]));
	if (argc >= 4 && !strcmp(argv[1], "restore"))
		return mode_restore(argv[2], atol(argv[3]));
	fprintf(stderr, "usage: client lat DEV get_state|preserve|event N | loop DEV N | "
			"hold DEV COUNT KIB | restore DEV COUNT\n");
	return 2;
}
