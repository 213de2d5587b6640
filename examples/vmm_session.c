/*
 * A VMM's live update with the session ABI of Linux 6.19 / 7.2, in two stages.
 *
 *   stage1: create guest RAM (a memfd), fill it with a pattern, open a session
 *           "vmm-guest" and preserve the RAM in it (token 1), then either
 *           reboot(LINUX_REBOOT_CMD_KEXEC) (-k) or leave a process holding the
 *           session fd (the session is carried only while its fd is open) and
 *           exit, so that someone else triggers the kexec.
 *   stage2: (in the next "boot") retrieve the session and the RAM, verify every
 *           byte, FINISH, close.
 *
 * Works the same against a 7.2 kernel and against `cusedev serve --abi 7.2`;
 * with the emulator, run each stage under `cusedev run` (session fds and the
 * retrieved memfd are new fds in this process; reboot() becomes the emulated
 * kexec).
 *
 * Build:  gcc -O2 -Wall -I cdefs -o vmm_session examples/vmm_session.c
 * Usage:  vmm_session stage1|stage2 [-d DEVICE] [-s MIB] [-n NAME] [-k]
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
#include <unistd.h>
#include <linux/ioctl.h>
#include <linux/reboot.h>
#include <linux/types.h>
#include "luo_session.h"

#define CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)
#define RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)
#define PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
#define RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
#define FINISH _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)
#define RAM_TOKEN 1

static void die(const char *what)
{
	fprintf(stderr, "vmm_session: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* the byte the guest "wrote" at offset i: depends on the page and the offset in it */
static uint8_t pattern(size_t i) { return (uint8_t)((i >> 12) * 31 + (i & 0xfff)); }

static int session_call(int dev, unsigned long cmd, const char *name)
{
	struct liveupdate_ioctl_create_session arg; /* the same layout as retrieve_session */

	memset(&arg, 0, sizeof(arg));
	arg.size = sizeof(arg);
	strncpy((char *)arg.name, name, sizeof(arg.name) - 1);
	if (ioctl(dev, cmd, &arg) < 0)
		return -1;
	return arg.fd;
}

static int stage1(const char *device, size_t size, const char *name, int do_kexec)
{
	struct liveupdate_session_preserve_fd pres = { .size = sizeof(pres), .token = RAM_TOKEN };
	int dev, sess, ram;
	uint8_t *p;

	dev = open(device, O_RDWR | O_CLOEXEC);
	if (dev < 0)
		die(device);
	ram = memfd_create("guest-ram", MFD_CLOEXEC);
	if (ram < 0 || ftruncate(ram, size) < 0)
		die("guest RAM");
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
	if (p == MAP_FAILED)
		die("mmap");
	for (size_t i = 0; i < size; i++)
		p[i] = pattern(i);

	sess = session_call(dev, CREATE_SESSION, name);
	if (sess < 0)
		die("CREATE_SESSION");
	pres.fd = ram;
	if (ioctl(sess, PRESERVE_FD, &pres) < 0)
		die("PRESERVE_FD");
	printf("stage1: session \"%s\" (fd %d) holds %zu MiB of guest RAM under token %d\n", name, sess,
	       size >> 20, RAM_TOKEN);
	/* the guest keeps running: writes after PRESERVE are carried too */
	p[0] = pattern(0);
	close(dev); /* sessions live on through their own fds */
	fflush(stdout);

	if (do_kexec) {
		sync();
		if (reboot(LINUX_REBOOT_CMD_KEXEC) < 0)
			die("reboot(KEXEC)");
		return 0; /* not reached on success */
	}
	if (fork() == 0) { /* hold the session until the machine reboots */
		int null = open("/dev/null", O_RDWR);

		setsid();
		dup2(null, 0); /* let go of the caller's terminal and pipes */
		dup2(null, 1);
		dup2(null, 2);
		for (;;)
			pause();
	}
	printf("stage1: a child holds the session; kexec now\n");
	return 0;
}

static int stage2(const char *device, size_t size, const char *name)
{
	struct liveupdate_session_retrieve_fd ret = { .size = sizeof(ret), .token = RAM_TOKEN };
	struct liveupdate_session_finish fin = { .size = sizeof(fin) };
	struct stat st;
	int dev, sess;
	uint8_t *p;

	dev = open(device, O_RDWR | O_CLOEXEC);
	if (dev < 0)
		die(device);
	sess = session_call(dev, RETRIEVE_SESSION, name);
	if (sess < 0)
		die("RETRIEVE_SESSION");
	if (ioctl(sess, RETRIEVE_FD, &ret) < 0)
		die("RETRIEVE_FD");
	if (fstat(ret.fd, &st) < 0)
		die("fstat");
	if ((size_t)st.st_size != size) {
		fprintf(stderr, "vmm_session: guest RAM is %lld bytes, expected %zu\n", (long long)st.st_size, size);
		return 1;
	}
	p = mmap(NULL, size, PROT_READ, MAP_SHARED, ret.fd, 0);
	if (p == MAP_FAILED)
		die("mmap");
	for (size_t i = 0; i < size; i++) {
		if (p[i] != pattern(i)) {
			fprintf(stderr, "vmm_session: guest RAM differs at byte %zu\n", i);
			return 1;
		}
	}
	if (ioctl(sess, FINISH, &fin) < 0)
		die("FINISH");
	close(sess);
	close(dev);
	printf("stage2: session \"%s\": %zu MiB of guest RAM verified, finished\n", name, size >> 20);
	return 0;
}

int main(int argc, char **argv)
{
	const char *device = "/dev/liveupdate", *name = "vmm-guest";
	size_t size = 4 << 20;
	int opt, do_kexec = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: %s stage1|stage2 [-d DEVICE] [-s MIB] [-n NAME] [-k]\n", argv[0]);
		return 2;
	}
	optind = 2;
	while ((opt = getopt(argc, argv, "d:s:n:k")) != -1) {
		switch (opt) {
		case 'd': device = optarg; break;
		case 's': size = (size_t)strtoul(optarg, NULL, 0) << 20; break;
		case 'n': name = optarg; break;
		case 'k': do_kexec = 1; break;
		default: return 2;
		}
	}
	if (!strcmp(argv[1], "stage1"))
		return stage1(device, size, name, do_kexec);
	if (!strcmp(argv[1], "stage2"))
		return stage2(device, size, name);
	fprintf(stderr, "unknown stage %s\n", argv[1]);
	return 2;
}
