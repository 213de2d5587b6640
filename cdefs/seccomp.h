/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The seccomp user-notification interface (linux/seccomp.h), the classic BPF
 * filter format (linux/filter.h, linux/bpf_common.h) and the few other kernel
 * numbers `cusedev run` needs to trap FD_RESTORE and reboot() in a client
 * (linux/audit.h, linux/reboot.h, asm/unistd_64.h), with the kernel's names
 * and types.
 *
 * Dual use:
 *   - C:    #include <linux/types.h> first, then this file (it cannot be
 *           combined with <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h>
 *           or <linux/reboot.h> in one translation unit: same names).
 *   - cffi: parsed by cusedev.uapi after cdefs/types.h.
 * Hence no include guard, no #include, no function-like macros, and values
 * written as integer literals instead of the kernel's "(1UL << n)" or
 * "(EM_X86_64|__AUDIT_ARCH_64BIT|__AUDIT_ARCH_LE)": cffi's cdef() has no
 * preprocessor and accepts only "#define NAME <integer literal>".
 * tests/test_seccomp_layout.py checks every size, offset and value here
 * against the system's kernel headers.
 *
 * The ioctl numbers of the listener fd need _IOWR() and are computed by
 * cusedev.seccomp from the struct sizes, as the kernel header does:
 *     SECCOMP_IOCTL_NOTIF_RECV      _IOWR('!', 0, struct seccomp_notif)
 *     SECCOMP_IOCTL_NOTIF_SEND      _IOWR('!', 1, struct seccomp_notif_resp)
 *     SECCOMP_IOCTL_NOTIF_ID_VALID  _IOW('!', 2, __u64)
 *     SECCOMP_IOCTL_NOTIF_ADDFD     _IOW('!', 3, struct seccomp_notif_addfd)
 */

/* seccomp(2) operations */
#define SECCOMP_SET_MODE_FILTER		1
#define SECCOMP_GET_NOTIF_SIZES		3

/* Flags for SECCOMP_SET_MODE_FILTER */
#define SECCOMP_FILTER_FLAG_NEW_LISTENER	8
/* Received notifications wait killable: a non-fatal signal cannot restart a
 * syscall the supervisor is already answering (Linux 5.19). */
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV	32

/* Filter return values: the action in the upper 16 bits, data below */
#define SECCOMP_RET_KILL_PROCESS	0x80000000
#define SECCOMP_RET_KILL_THREAD		0x00000000
#define SECCOMP_RET_ERRNO		0x00050000
#define SECCOMP_RET_USER_NOTIF		0x7fc00000
#define SECCOMP_RET_ALLOW		0x7fff0000
#define SECCOMP_RET_ACTION_FULL		0xffff0000
#define SECCOMP_RET_DATA		0x0000ffff

/* struct seccomp_notif_resp.flags */
#define SECCOMP_USER_NOTIF_FLAG_CONTINUE	1

/* struct seccomp_notif_addfd.flags */
#define SECCOMP_ADDFD_FLAG_SETFD	1	/* install at newfd */
#define SECCOMP_ADDFD_FLAG_SEND		2	/* install and reply with the fd, atomically */

#define SECCOMP_IOC_MAGIC		33	/* '!' */

/* What the BPF program runs over. */
struct seccomp_data {
	int nr;
	__u32 arch;
	__u64 instruction_pointer;
	__u64 args[6];
};

struct seccomp_notif_sizes {
	__u16 seccomp_notif;
	__u16 seccomp_notif_resp;
	__u16 seccomp_data;
};

struct seccomp_notif {
	__u64 id;
	__u32 pid;
	__u32 flags;
	struct seccomp_data data;
};

struct seccomp_notif_resp {
	__u64 id;
	__s64 val;
	__s32 error;
	__u32 flags;
};

struct seccomp_notif_addfd {
	__u64 id;
	__u32 flags;
	__u32 srcfd;
	__u32 newfd;
	__u32 newfd_flags;
};

/* Classic BPF (linux/filter.h) */
struct sock_filter {
	__u16 code;
	__u8 jt;
	__u8 jf;
	__u32 k;
};

struct sock_fprog {
	unsigned short len;
	struct sock_filter *filter;
};

/* Classic BPF opcodes (linux/bpf_common.h) */
#define BPF_LD		0x00
#define BPF_JMP		0x05
#define BPF_RET		0x06
#define BPF_W		0x00
#define BPF_ABS		0x20
#define BPF_JEQ		0x10
#define BPF_K		0x00

/* seccomp_data.arch (linux/audit.h) */
#define AUDIT_ARCH_X86_64	0xc000003e
#define AUDIT_ARCH_I386		0x40000003

/* x86_64 syscall numbers (asm/unistd_64.h), and the x32 ABI's marker bit */
#define X86_64_NR_ioctl		16
#define X86_64_NR_reboot	169
#define X86_64_NR_seccomp	317
#define X86_64_X32_SYSCALL_BIT	0x40000000
/* i386 (int 0x80 on an x86_64 kernel, asm/unistd_32.h) */
#define I386_NR_reboot		88

/* reboot(2) (linux/reboot.h) */
#define LINUX_REBOOT_MAGIC1		0xfee1dead
#define LINUX_REBOOT_MAGIC2		672274793
#define LINUX_REBOOT_MAGIC2A		85072278
#define LINUX_REBOOT_MAGIC2B		369367448
#define LINUX_REBOOT_MAGIC2C		537993216
#define LINUX_REBOOT_CMD_RESTART	0x01234567
#define LINUX_REBOOT_CMD_HALT		0xcdef0123
#define LINUX_REBOOT_CMD_CAD_ON		0x89abcdef
#define LINUX_REBOOT_CMD_CAD_OFF	0x00000000
#define LINUX_REBOOT_CMD_POWER_OFF	0x4321fedc
#define LINUX_REBOOT_CMD_RESTART2	0xa1b2c3d4
#define LINUX_REBOOT_CMD_SW_SUSPEND	0xd000fce2
#define LINUX_REBOOT_CMD_KEXEC		0x45584543
