/*
 * A VMM's live-update loop against /dev/liveupdate (LUO ABI v3), in two stages.
 *
 *   stage1: create guest RAM (a memfd), fill it with a pattern, preserve it,
 *           PREPARE, then reboot(LINUX_REBOOT_CMD_KEXEC).
 *   stage2: (in the next "boot") restore the memfd, verify every byte, FINISH.
 *
 * Works the same against a real LUO v3 kernel and against cusedev; with the
 * emulator, run each stage under `cusedev run` so that FD_RESTORE can install
 * an fd and reboot() becomes the emulated kexec.
 *
 * Build:  gcc -O2 -Wall -I cdefs -o vmm_demo examples/vmm_demo.c
 * Usage:  vmm_demo stage1|stage2 [-d DEVICE] [-s MIB] [-t TOKEN]
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
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/ioctl.h>
#include <linux/reboot.h>
#include <linux/types.h>
#include "luo_v3.h"

#define LUO_IO(cmd) _IO(LIVEUPDATE_IOCTL_TYPE, cmd)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t pattern(uint64_t i, uint64_t token)
{
	return (i * 0x9E3779B97F4A7C15ull) ^ token;
}

static void die(const char *what)
{
	fprintf(stderr, "vmm_demo: %s: %s\n", what, strerror(errno));
	exit(1);
}

static const char *state_name(__u32 s)
{
	static const char *names[] = { "undefined", "normal", "prepared", "frozen", "updated" };
	return s < 5 ? names[s] : "?";
}

static __u32 get_state(int dev)
{
	struct liveupdate_ioctl_get_state gs = { .size = sizeof(gs) };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_GET_STATE), &gs))
		die("GET_STATE");
	return gs.state;
}

static void set_event(int dev, __u32 event, const char *name)
{
	struct liveupdate_ioctl_set_event ev = { .size = sizeof(ev), .event = event };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_SET_EVENT), &ev))
		die(name);
}

static int stage1(int dev, size_t bytes, __u64 token)
{
	double t0 = now();
	int ram = memfd_create("guest-ram", MFD_CLOEXEC);
	if (ram < 0 || ftruncate(ram, bytes))
		die("guest RAM memfd");
	uint64_t *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
	if (p == MAP_FAILED)
		die("mmap");
	for (size_t i = 0; i < bytes / 8; i++)
		p[i] = pattern(i, token);
	munmap(p, bytes);
	printf("stage1: guest RAM %zu MiB filled in %.0f ms\n", bytes >> 20, (now() - t0) * 1e3);

	struct liveupdate_ioctl_fd_preserve pr = { .size = sizeof(pr), .fd = ram, .token = token };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_FD_PRESERVE), &pr))
		die("FD_PRESERVE");
	set_event(dev, LIVEUPDATE_PREPARE, "SET_EVENT(PREPARE)");
	printf("stage1: preserved as token %#llx, state %s; rebooting into the next kernel\n",
	       (unsigned long long)token, state_name(get_state(dev)));
	fflush(stdout);

	if (!getenv("CUSEDEV_RUN") && !getenv("VMM_DEMO_REAL_KEXEC")) {
		fprintf(stderr, "vmm_demo: not under `cusedev run` and VMM_DEMO_REAL_KEXEC is not set: "
				"refusing to call reboot()\n");
		return 2;
	}
	reboot(LINUX_REBOOT_CMD_KEXEC);
	die("reboot(LINUX_REBOOT_CMD_KEXEC)"); /* only reached when the kexec failed */
	return 1;
}

static int stage2(int dev, size_t bytes, __u64 token)
{
	__u32 st = get_state(dev);
	if (st != LIVEUPDATE_STATE_UPDATED) {
		fprintf(stderr, "vmm_demo: state is %s, not updated: no live update happened\n", state_name(st));
		return 1;
	}
	double t0 = now();
	struct liveupdate_ioctl_fd_restore rs = { .size = sizeof(rs), .token = token };
	if (ioctl(dev, LUO_IO(LIVEUPDATE_CMD_FD_RESTORE), &rs))
		die("FD_RESTORE");
	double t1 = now();
	int flags = fcntl(rs.fd, F_GETFD);
	struct stat sb;
	if (fstat(rs.fd, &sb))
		die("fstat");
	if ((size_t)sb.st_size != bytes) {
		fprintf(stderr, "vmm_demo: restored size %lld, expected %zu\n", (long long)sb.st_size, bytes);
		return 1;
	}
	uint64_t *p = mmap(NULL, bytes, PROT_READ, MAP_SHARED, rs.fd, 0);
	if (p == MAP_FAILED)
		die("mmap");
	for (size_t i = 0; i < bytes / 8; i++) {
		if (p[i] != pattern(i, token)) {
			fprintf(stderr, "vmm_demo: guest RAM differs at byte %zu\n", i * 8);
			return 1;
		}
	}
	munmap(p, bytes);
	printf("stage2: restored fd %d (%s) in %.2f ms; all %zu MiB verified in %.0f ms\n", rs.fd,
	       (flags & FD_CLOEXEC) ? "O_CLOEXEC" : "no O_CLOEXEC!", (t1 - t0) * 1e3, bytes >> 20,
	       (now() - t1) * 1e3);
	set_event(dev, LIVEUPDATE_FINISH, "SET_EVENT(FINISH)");
	printf("stage2: finished, state %s\n", state_name(get_state(dev)));
	return (flags & FD_CLOEXEC) ? 0 : 1;
}

int main(int argc, char **argv)
{
	const char *device = "/dev/liveupdate";
	size_t mib = 256;
	__u64 token = 0x6775657374;
	int opt;

	if (argc < 2) {
		fprintf(stderr, "usage: %s stage1|stage2 [-d DEVICE] [-s MIB] [-t TOKEN]\n", argv[0]);
		return 2;
	}
	optind = 2;
	while ((opt = getopt(argc, argv, "d:s:t:")) != -1) {
		if (opt == 'd')
			device = optarg;
		else if (opt == 's')
			mib = strtoull(optarg, NULL, 0);
		else if (opt == 't')
			token = strtoull(optarg, NULL, 0);
		else
			return 2;
	}
	int dev = open(device, O_RDWR | O_CLOEXEC);
	if (dev < 0)
		die(device);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(argv[1], "stage1"))
		return stage1(dev, mib << 20, token);
	if (!strcmp(argv[1], "stage2"))
		return stage2(dev, mib << 20, token);
	fprintf(stderr, "unknown stage %s\n", argv[1]);
	return 2;
}
