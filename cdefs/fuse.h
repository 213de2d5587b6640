/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause) */
/*
 * The subset of the FUSE/CUSE wire protocol (linux/fuse.h, protocol 7.38)
 * that cusedev speaks, with the kernel's names and types.
 *
 * Dual use:
 *   - C:    #include <stdint.h> first, then this file (it cannot be combined
 *           with <linux/fuse.h> in one translation unit: same names).
 *   - cffi: parsed by cusedev.uapi.
 * Hence no include guard, no #include, no function-like macros, and flag
 * values written as integer literals instead of the kernel's "(1 << n)":
 * cffi's cdef() has no preprocessor and accepts only
 * "#define NAME <integer literal>".  tests/test_uapi_layout.py checks every
 * size, offset and value here against the system's <linux/fuse.h>.
 *
 * Structs are padded to a 64-bit boundary so 32-bit userspace works under a
 * 64-bit kernel.  Newer kernels only carve new fields out of reserved
 * "unused"/"padding" space, keeping every struct size (the negotiated
 * protocol minor decides which fields either side reads).
 */

#define FUSE_KERNEL_VERSION 7
#define FUSE_KERNEL_MINOR_VERSION 38
#define FUSE_ROOT_ID 1

/* The read buffer is required to be at least 8k, but may be much larger */
#define FUSE_MIN_READ_BUFFER 8192

/* Sizes of the older (shorter) versions of some replies/requests */
#define FUSE_COMPAT_ENTRY_OUT_SIZE 120
#define FUSE_COMPAT_ATTR_OUT_SIZE 96
#define FUSE_COMPAT_MKNOD_IN_SIZE 8
#define FUSE_COMPAT_WRITE_IN_SIZE 24
#define FUSE_COMPAT_STATFS_SIZE 48
#define FUSE_COMPAT_SETXATTR_IN_SIZE 8
#define FUSE_COMPAT_INIT_OUT_SIZE 8
#define FUSE_COMPAT_22_INIT_OUT_SIZE 24

/* Bitmasks for fuse_setattr_in.valid */
#define FATTR_MODE		0x1
#define FATTR_UID		0x2
#define FATTR_GID		0x4
#define FATTR_SIZE		0x8
#define FATTR_ATIME		0x10
#define FATTR_MTIME		0x20
#define FATTR_FH		0x40
#define FATTR_ATIME_NOW		0x80
#define FATTR_MTIME_NOW		0x100
#define FATTR_LOCKOWNER		0x200
#define FATTR_CTIME		0x400
#define FATTR_KILL_SUIDGID	0x800

/* Flags returned by the OPEN request (fuse_open_out.open_flags) */
#define FOPEN_DIRECT_IO			0x1
#define FOPEN_KEEP_CACHE		0x2
#define FOPEN_NONSEEKABLE		0x4
#define FOPEN_CACHE_DIR			0x8
#define FOPEN_STREAM			0x10
#define FOPEN_NOFLUSH			0x20
#define FOPEN_PARALLEL_DIRECT_WRITES	0x40

/* INIT request/reply flags (fuse_init_in/out.flags; bits 32..63 go to flags2) */
#define FUSE_ASYNC_READ		0x1
#define FUSE_POSIX_LOCKS	0x2
#define FUSE_FILE_OPS		0x4
#define FUSE_ATOMIC_O_TRUNC	0x8
#define FUSE_EXPORT_SUPPORT	0x10
#define FUSE_BIG_WRITES		0x20
#define FUSE_DONT_MASK		0x40
#define FUSE_SPLICE_WRITE	0x80
#define FUSE_SPLICE_MOVE	0x100
#define FUSE_SPLICE_READ	0x200
#define FUSE_FLOCK_LOCKS	0x400
#define FUSE_HAS_IOCTL_DIR	0x800
#define FUSE_AUTO_INVAL_DATA	0x1000
#define FUSE_DO_READDIRPLUS	0x2000
#define FUSE_READDIRPLUS_AUTO	0x4000
#define FUSE_ASYNC_DIO		0x8000
#define FUSE_WRITEBACK_CACHE	0x10000
#define FUSE_NO_OPEN_SUPPORT	0x20000
#define FUSE_PARALLEL_DIROPS	0x40000
#define FUSE_HANDLE_KILLPRIV	0x80000
#define FUSE_POSIX_ACL		0x100000
#define FUSE_ABORT_ERROR	0x200000
#define FUSE_MAX_PAGES		0x400000
#define FUSE_CACHE_SYMLINKS	0x800000
#define FUSE_NO_OPENDIR_SUPPORT	0x1000000
#define FUSE_EXPLICIT_INVAL_DATA	0x2000000
#define FUSE_MAP_ALIGNMENT	0x4000000
#define FUSE_SUBMOUNTS		0x8000000
#define FUSE_HANDLE_KILLPRIV_V2	0x10000000
#define FUSE_SETXATTR_EXT	0x20000000
#define FUSE_INIT_EXT		0x40000000
#define FUSE_INIT_RESERVED	0x80000000
#define FUSE_SECURITY_CTX	0x100000000
#define FUSE_HAS_INODE_DAX	0x200000000
#define FUSE_HAS_EXPIRE_ONLY	0x800000000

/* CUSE INIT request/reply flags */
#define CUSE_UNRESTRICTED_IOCTL	0x1

/* Release flags */
#define FUSE_RELEASE_FLUSH		0x1
#define FUSE_RELEASE_FLOCK_UNLOCK	0x2

/* Getattr flags */
#define FUSE_GETATTR_FH		0x1

/* Lock flags */
#define FUSE_LK_FLOCK		0x1

/* WRITE flags */
#define FUSE_WRITE_CACHE	0x1
#define FUSE_WRITE_LOCKOWNER	0x2
#define FUSE_WRITE_KILL_SUIDGID	0x4
#define FUSE_WRITE_KILL_PRIV	0x4	/* obsolete alias of FUSE_WRITE_KILL_SUIDGID */

/* Read flags */
#define FUSE_READ_LOCKOWNER	0x2

/*
 * Ioctl flags
 * FUSE_IOCTL_COMPAT: 32bit compat ioctl on 64bit machine
 * FUSE_IOCTL_UNRESTRICTED: not restricted to well-formed ioctls, retry allowed
 * FUSE_IOCTL_RETRY: retry with new iovecs
 * FUSE_IOCTL_32BIT: 32bit ioctl
 * FUSE_IOCTL_DIR: is a directory
 * FUSE_IOCTL_COMPAT_X32: x32 compat ioctl on 64bit machine (64bit time_t)
 * FUSE_IOCTL_MAX_IOV: maximum of in_iovecs + out_iovecs
 */
#define FUSE_IOCTL_COMPAT	0x1
#define FUSE_IOCTL_UNRESTRICTED	0x2
#define FUSE_IOCTL_RETRY	0x4
#define FUSE_IOCTL_32BIT	0x8
#define FUSE_IOCTL_DIR		0x10
#define FUSE_IOCTL_COMPAT_X32	0x20
#define FUSE_IOCTL_MAX_IOV	256

/* Poll flags: request poll notify */
#define FUSE_POLL_SCHEDULE_NOTIFY	0x1

/* Fsync flags */
#define FUSE_FSYNC_FDATASYNC	0x1

/* fuse_attr flags */
#define FUSE_ATTR_SUBMOUNT	0x1
#define FUSE_ATTR_DAX		0x2

/* Open flags (fuse_open_in.open_flags) */
#define FUSE_OPEN_KILL_SUIDGID	0x1

/* Maximum size of the device info string in the CUSE_INIT reply */
#define CUSE_INIT_INFO_MAX	4096

/* Magic of the /dev/fuse ioctls (FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t)) */
#define FUSE_DEV_IOC_MAGIC	229

enum fuse_opcode {
	FUSE_LOOKUP		= 1,
	FUSE_FORGET		= 2,  /* no reply */
	FUSE_GETATTR		= 3,
	FUSE_SETATTR		= 4,
	FUSE_READLINK		= 5,
	FUSE_SYMLINK		= 6,
	FUSE_MKNOD		= 8,
	FUSE_MKDIR		= 9,
	FUSE_UNLINK		= 10,
	FUSE_RMDIR		= 11,
	FUSE_RENAME		= 12,
	FUSE_LINK		= 13,
	FUSE_OPEN		= 14,
	FUSE_READ		= 15,
	FUSE_WRITE		= 16,
	FUSE_STATFS		= 17,
	FUSE_RELEASE		= 18,
	FUSE_FSYNC		= 20,
	FUSE_SETXATTR		= 21,
	FUSE_GETXATTR		= 22,
	FUSE_LISTXATTR		= 23,
	FUSE_REMOVEXATTR	= 24,
	FUSE_FLUSH		= 25,
	FUSE_INIT		= 26,
	FUSE_OPENDIR		= 27,
	FUSE_READDIR		= 28,
	FUSE_RELEASEDIR		= 29,
	FUSE_FSYNCDIR		= 30,
	FUSE_GETLK		= 31,
	FUSE_SETLK		= 32,
	FUSE_SETLKW		= 33,
	FUSE_ACCESS		= 34,
	FUSE_CREATE		= 35,
	FUSE_INTERRUPT		= 36,
	FUSE_BMAP		= 37,
	FUSE_DESTROY		= 38,
	FUSE_IOCTL		= 39,
	FUSE_POLL		= 40,
	FUSE_NOTIFY_REPLY	= 41,
	FUSE_BATCH_FORGET	= 42,
	FUSE_FALLOCATE		= 43,
	FUSE_READDIRPLUS	= 44,
	FUSE_RENAME2		= 45,
	FUSE_LSEEK		= 46,
	FUSE_COPY_FILE_RANGE	= 47,
	FUSE_SETUPMAPPING	= 48,
	FUSE_REMOVEMAPPING	= 49,
	FUSE_SYNCFS		= 50,
	FUSE_TMPFILE		= 51,

	/* CUSE specific operations */
	CUSE_INIT		= 4096,

	/* Reserved opcodes: helpful to detect structure endian-ness */
	CUSE_INIT_BSWAP_RESERVED	= 1048576,	/* CUSE_INIT << 8 */
	FUSE_INIT_BSWAP_RESERVED	= 436207616,	/* FUSE_INIT << 24 */
};

enum fuse_notify_code {
	FUSE_NOTIFY_POLL	= 1,
	FUSE_NOTIFY_INVAL_INODE	= 2,
	FUSE_NOTIFY_INVAL_ENTRY	= 3,
	FUSE_NOTIFY_STORE	= 4,
	FUSE_NOTIFY_RETRIEVE	= 5,
	FUSE_NOTIFY_DELETE	= 6,
	FUSE_NOTIFY_CODE_MAX,
};

struct fuse_attr {
	uint64_t	ino;
	uint64_t	size;
	uint64_t	blocks;
	uint64_t	atime;
	uint64_t	mtime;
	uint64_t	ctime;
	uint32_t	atimensec;
	uint32_t	mtimensec;
	uint32_t	ctimensec;
	uint32_t	mode;
	uint32_t	nlink;
	uint32_t	uid;
	uint32_t	gid;
	uint32_t	rdev;
	uint32_t	blksize;
	uint32_t	flags;
};

struct fuse_kstatfs {
	uint64_t	blocks;
	uint64_t	bfree;
	uint64_t	bavail;
	uint64_t	files;
	uint64_t	ffree;
	uint32_t	bsize;
	uint32_t	namelen;
	uint32_t	frsize;
	uint32_t	padding;
	uint32_t	spare[6];
};

/* Header of every request read from /dev/fuse or /dev/cuse */
struct fuse_in_header {
	uint32_t	len;
	uint32_t	opcode;
	uint64_t	unique;
	uint64_t	nodeid;
	uint32_t	uid;
	uint32_t	gid;
	uint32_t	pid;
	uint16_t	total_extlen;	/* length of extensions in 8byte units */
	uint16_t	padding;
};

/* Header of every reply (error is a negative errno) and notification */
struct fuse_out_header {
	uint32_t	len;
	int32_t		error;
	uint64_t	unique;
};

struct fuse_init_in {
	uint32_t	major;
	uint32_t	minor;
	uint32_t	max_readahead;
	uint32_t	flags;
	uint32_t	flags2;
	uint32_t	unused[11];
};

struct fuse_init_out {
	uint32_t	major;
	uint32_t	minor;
	uint32_t	max_readahead;
	uint32_t	flags;
	uint16_t	max_background;
	uint16_t	congestion_threshold;
	uint32_t	max_write;
	uint32_t	time_gran;
	uint16_t	max_pages;
	uint16_t	map_alignment;
	uint32_t	flags2;
	uint32_t	unused[7];
};

/* CUSE_INIT request; the reply is cuse_init_out + "KEY=VAL\0..." device info */
struct cuse_init_in {
	uint32_t	major;
	uint32_t	minor;
	uint32_t	unused;
	uint32_t	flags;
};

struct cuse_init_out {
	uint32_t	major;
	uint32_t	minor;
	uint32_t	unused;
	uint32_t	flags;
	uint32_t	max_read;
	uint32_t	max_write;
	uint32_t	dev_major;	/* chardev major */
	uint32_t	dev_minor;	/* chardev minor */
	uint32_t	spare[10];
};

struct fuse_entry_out {
	uint64_t	nodeid;		/* Inode ID */
	uint64_t	generation;	/* Inode generation */
	uint64_t	entry_valid;	/* Cache timeout for the name */
	uint64_t	attr_valid;	/* Cache timeout for the attributes */
	uint32_t	entry_valid_nsec;
	uint32_t	attr_valid_nsec;
	struct fuse_attr attr;
};

struct fuse_forget_in {
	uint64_t	nlookup;
};

struct fuse_forget_one {
	uint64_t	nodeid;
	uint64_t	nlookup;
};

/* Followed by count * struct fuse_forget_one */
struct fuse_batch_forget_in {
	uint32_t	count;
	uint32_t	dummy;
};

struct fuse_getattr_in {
	uint32_t	getattr_flags;
	uint32_t	dummy;
	uint64_t	fh;
};

struct fuse_attr_out {
	uint64_t	attr_valid;	/* Cache timeout for the attributes */
	uint32_t	attr_valid_nsec;
	uint32_t	dummy;
	struct fuse_attr attr;
};

struct fuse_setattr_in {
	uint32_t	valid;
	uint32_t	padding;
	uint64_t	fh;
	uint64_t	size;
	uint64_t	lock_owner;
	uint64_t	atime;
	uint64_t	mtime;
	uint64_t	ctime;
	uint32_t	atimensec;
	uint32_t	mtimensec;
	uint32_t	ctimensec;
	uint32_t	mode;
	uint32_t	unused4;
	uint32_t	uid;
	uint32_t	gid;
	uint32_t	unused5;
};

struct fuse_open_in {
	uint32_t	flags;
	uint32_t	open_flags;	/* FUSE_OPEN_... */
};

struct fuse_open_out {
	uint64_t	fh;
	uint32_t	open_flags;	/* FOPEN_... */
	uint32_t	padding;
};

struct fuse_release_in {
	uint64_t	fh;
	uint32_t	flags;
	uint32_t	release_flags;
	uint64_t	lock_owner;
};

struct fuse_flush_in {
	uint64_t	fh;
	uint32_t	unused;
	uint32_t	padding;
	uint64_t	lock_owner;
};

struct fuse_read_in {
	uint64_t	fh;
	uint64_t	offset;
	uint32_t	size;
	uint32_t	read_flags;
	uint64_t	lock_owner;
	uint32_t	flags;
	uint32_t	padding;
};

struct fuse_write_in {
	uint64_t	fh;
	uint64_t	offset;
	uint32_t	size;
	uint32_t	write_flags;
	uint64_t	lock_owner;
	uint32_t	flags;
	uint32_t	padding;
};

struct fuse_write_out {
	uint32_t	size;
	uint32_t	padding;
};

struct fuse_statfs_out {
	struct fuse_kstatfs st;
};

struct fuse_access_in {
	uint32_t	mask;
	uint32_t	padding;
};

struct fuse_interrupt_in {
	uint64_t	unique;
};

/* Followed by in_size bytes of ioctl input (CUSE: the server asks for them) */
struct fuse_ioctl_in {
	uint64_t	fh;
	uint32_t	flags;
	uint32_t	cmd;
	uint64_t	arg;
	uint32_t	in_size;
	uint32_t	out_size;
};

struct fuse_ioctl_iovec {
	uint64_t	base;
	uint64_t	len;
};

/* Followed by in_iovs + out_iovs fuse_ioctl_iovec on FUSE_IOCTL_RETRY, else by output data */
struct fuse_ioctl_out {
	int32_t		result;
	uint32_t	flags;
	uint32_t	in_iovs;
	uint32_t	out_iovs;
};

struct fuse_poll_in {
	uint64_t	fh;
	uint64_t	kh;
	uint32_t	flags;
	uint32_t	events;
};

struct fuse_poll_out {
	uint32_t	revents;
	uint32_t	padding;
};

struct fuse_notify_poll_wakeup_out {
	uint64_t	kh;
};

struct fuse_notify_inval_inode_out {
	uint64_t	ino;
	int64_t		off;
	int64_t		len;
};

/* The kernel's struct ends in a flexible "char name[]" (namelen bytes, then padding to 8) */
struct fuse_dirent {
	uint64_t	ino;
	uint64_t	off;
	uint32_t	namelen;
	uint32_t	type;
};
