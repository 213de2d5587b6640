/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * The session ABI of /dev/liveupdate as merged in Linux 6.19 and shipped in
 * 7.2 (cusedev profiles "6.19" and "7.2"), restated for cusedev from
 * /work/shared/spec/luo-session.md section 1.  The identifiers are the ABI's
 * own (a client compiled against the kernel header must find the same names,
 * numbers and layouts); the text is ours.
 *
 * Dual use, like luo_v3.h:
 *   - C:    #include <linux/types.h> first, then this file.  It is an
 *           alternative to luo_v3.h (both define LIVEUPDATE_IOCTL_TYPE), never
 *           included beside it.
 *   - cffi: parsed by cusedev.profiles.session.uapi after cdefs/types.h, in an
 *           FFI of its own.
 * So: no include guard, no #include, no function-like macros, no attributes,
 * and "#define NAME <integer literal>" only.
 *
 * Every command is _IO(LIVEUPDATE_IOCTL_TYPE, nr): no size or direction bits,
 * the argument struct says its own size in its first field (extensible
 * structs: a larger size is accepted when the extra bytes are zero).
 * Two command spaces exist: the device's (nr from 0x00) and that of a session
 * fd, the file returned by CREATE_SESSION / RETRIEVE_SESSION (nr from 0x40).
 */

/* ioctl type byte, shared with every /dev/liveupdate ABI */
#define LIVEUPDATE_IOCTL_TYPE 0xBA

/* bytes of a session name buffer; the terminating NUL is counted */
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

/* commands of /dev/liveupdate itself */
enum {
	LIVEUPDATE_CMD_BASE = 0x00,
	LIVEUPDATE_CMD_CREATE_SESSION = LIVEUPDATE_CMD_BASE,
	LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01,
};

/* commands of a session fd (GET_NAME exists from 7.2 on) */
enum {
	LIVEUPDATE_CMD_SESSION_BASE = 0x40,
	LIVEUPDATE_CMD_SESSION_PRESERVE_FD = LIVEUPDATE_CMD_SESSION_BASE,
	LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41,
	LIVEUPDATE_CMD_SESSION_FINISH = 0x42,
	LIVEUPDATE_CMD_SESSION_GET_NAME = 0x43,
};

/*
 * CREATE_SESSION: open a new outgoing session called @name and get an fd for it.
 * @size: in;  the caller's sizeof(this struct)
 * @fd:   out; the new session fd (close-on-exec)
 * @name: in;  NUL-terminated session name, unique among outgoing sessions
 */
struct liveupdate_ioctl_create_session {
	__u32	size;
	__s32	fd;
	__u8	name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/*
 * RETRIEVE_SESSION: claim a session carried over by the last live update.
 * @size: in;  the caller's sizeof(this struct)
 * @fd:   out; the session fd (close-on-exec)
 * @name: in;  the name the session had in the previous kernel
 */
struct liveupdate_ioctl_retrieve_session {
	__u32	size;
	__s32	fd;
	__u8	name[LIVEUPDATE_SESSION_NAME_LENGTH];
};

/*
 * SESSION_PRESERVE_FD: hand a file (a memfd) to an outgoing session.
 * @size:  in; the caller's sizeof(this struct)
 * @fd:    in; the caller's descriptor of the file
 * @token: in; the caller's key for the file, unique within the session
 */
struct liveupdate_session_preserve_fd {
	__u32		size;
	__s32		fd;
	__aligned_u64	token;
};

/*
 * SESSION_RETRIEVE_FD: get a carried file back from an incoming session.
 * @size:  in;  the caller's sizeof(this struct)
 * @fd:    out; a new descriptor of the restored file (close-on-exec)
 * @token: in;  the key the file was preserved under
 */
struct liveupdate_session_retrieve_fd {
	__u32		size;
	__s32		fd;
	__aligned_u64	token;
};

/*
 * SESSION_FINISH: the caller is done with an incoming session; files it did
 * not retrieve are dropped.
 * @size:     in; the caller's sizeof(this struct)
 * @reserved: in; must be 0 (checked from 7.2 on)
 */
struct liveupdate_session_finish {
	__u32	size;
	__u32	reserved;
};

/*
 * SESSION_GET_NAME (7.2): read the name of the session behind an fd.
 * @size:     in;  the caller's sizeof(this struct)
 * @reserved: in;  must be 0
 * @name:     out; the session name, NUL-terminated
 */
struct liveupdate_session_get_name {
	__u32	size;
	__u32	reserved;
	__u8	name[LIVEUPDATE_SESSION_NAME_LENGTH];
};
