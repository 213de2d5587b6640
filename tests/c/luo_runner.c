/*
 * A line-driven /dev/liveupdate client for the test suite: the same scenario
 * table drives this C client and the Python one, so every errno row is
 * checked from compiled code against the real kernel path too.
 *
 * Commands (one per line on stdin; one reply line per command on stdout):
 *   open PATH              -> "ok" | "err ERRNO"
 *   close                  -> "ok"
 *   memfd SIZE             -> "fd N"    (memfd filled with a byte pattern)
 *   openfile PATH FLAGS    -> "fd N" | "err ERRNO"  (FLAGS: r, w, path)
 *   tmpfile DIR            -> "fd N" | "err ERRNO"  (O_TMPFILE, unlinked)
 *   closefd N              -> "ok"
 *   ioctl CMD WHERE HEX    -> "rc R ERRNO HEXOUT"
 *       WHERE: heap (ordinary buffer), pageend (bytes end at a page followed
 *       by an unmapped page), readonly (read-only page), null, unmapped.
 *   read | write           -> "rc R ERRNO"
 *   quit
 * Build: gcc -O2 -Wall -I cdefs -o luo_runner tests/c/luo_runner.c
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
#include <linux/types.h>
#include "luo_v3.h"

static int dev = -1;
static long pg;

static size_t unhex(const char *s, unsigned char *out, size_t max)
{
	size_t n = 0;
	if (strcmp(s, "-") == 0)
		return 0;
	while (s[0] && s[1] && n < max) {
		unsigned v;
		sscanf(s, "%2x", &v);
		out[n++] = (unsigned char)v;
		s += 2;
	}
	return n;
}

static void hexout(const unsigned char *p, size_t n)
{
	if (!n)
		fputs("-", stdout);
	for (size_t i = 0; i < n; i++)
		printf("%02x", p[i]);
}

static void do_ioctl(unsigned long cmd, const char *where, const char *hex)
{
	static unsigned char data[65536];
	size_t n = unhex(hex, data, sizeof(data));
	unsigned char *buf = NULL, *map = NULL;
	size_t maplen = 0;
	int r;

	if (!strcmp(where, "null")) {
		buf = NULL;
	} else if (!strcmp(where, "unmapped")) {
		map = mmap(NULL, pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		munmap(map, pg);
		buf = map;
		map = NULL;
	} else if (!strcmp(where, "pageend") || !strcmp(where, "readonly")) {
		size_t pages = (n + pg - 1) / pg + 1;
		maplen = (pages + 1) * pg;
		map = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		munmap(map + pages * pg, pg); /* a hole after the data */
		maplen -= pg;
		buf = map + pages * pg - n;
		memcpy(buf, data, n);
		if (!strcmp(where, "readonly"))
			mprotect(map, maplen, PROT_READ);
	} else {
		buf = malloc(n ? n : 1);
		memcpy(buf, data, n);
	}
	errno = 0;
	r = ioctl(dev, cmd, buf);
	printf("rc %d %d ", r, r < 0 ? errno : 0);
	if (buf && strcmp(where, "unmapped"))
		hexout(buf, n);
	else
		fputs("-", stdout);
	putchar('\n');
	if (map)
		munmap(map, maplen);
	else if (buf && strcmp(where, "null") && strcmp(where, "unmapped"))
		free(buf);
}

int main(void)
{
	char line[200000], a[256], b[256];
	pg = sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		static char hex[200000];
		unsigned long cmd;
		long v;

		if (!strncmp(line, "open ", 5) && sscanf(line + 5, "%255s", a) == 1) {
			dev = open(a, O_RDWR | O_CLOEXEC);
			if (dev < 0)
				printf("err %d\n", errno);
			else
				puts("ok");
		} else if (!strncmp(line, "closefd ", 8)) {
			close(atoi(line + 8));
			puts("ok");
		} else if (!strncmp(line, "close", 5)) {
			close(dev);
			dev = -1;
			puts("ok");
		} else if (!strncmp(line, "memfd ", 6) && sscanf(line + 6, "%ld", &v) == 1) {
			int fd = memfd_create("luo-test", MFD_CLOEXEC);
			if (ftruncate(fd, v) == 0 && v > 0) {
				char *p = mmap(NULL, v, PROT_WRITE, MAP_SHARED, fd, 0);
				for (long i = 0; i < v; i++)
					p[i] = (char)(i * 7 + 3);
				munmap(p, v);
			}
			printf("fd %d\n", fd);
		} else if (!strncmp(line, "openfile ", 9) && sscanf(line + 9, "%255s %255s", a, b) == 2) {
			int fl = !strcmp(b, "path") ? O_PATH : !strcmp(b, "w") ? O_RDWR : O_RDONLY;
			int fd = open(a, fl | O_CLOEXEC);
			if (fd < 0)
				printf("err %d\n", errno);
			else
				printf("fd %d\n", fd);
		} else if (!strncmp(line, "tmpfile ", 8) && sscanf(line + 8, "%255s", a) == 1) {
			int fd = open(a, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
			if (fd < 0)
				printf("err %d\n", errno);
			else
				printf("fd %d\n", fd);
		} else if (!strncmp(line, "ioctl ", 6) && sscanf(line + 6, "%lx %255s %199999s", &cmd, a, hex) == 3) {
			do_ioctl(cmd, a, hex);
		} else if (!strncmp(line, "read", 4)) {
			char c[16];
			ssize_t r = read(dev, c, sizeof(c));
			printf("rc %zd %d\n", r, r < 0 ? errno : 0);
		} else if (!strncmp(line, "write", 5)) {
			ssize_t r = write(dev, "x", 1);
			printf("rc %zd %d\n", r, r < 0 ? errno : 0);
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			printf("bad command\n");
		}
	}
	return 0;
}
