/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Userspace interface of /dev/liveupdate, Live Update Orchestrator ABI v3
 * ("[PATCH v3 00/30] Live Update Orchestrator", LKML 2025-08-07), restated
 * for cusedev.  Names, types and values follow include/uapi/linux/liveupdate.h
 * of that series; see /work/shared/spec/luo-v3.md section 1.
 *
 * Dual use:
 *   - C:    #include <linux/types.h> first, then this file.
 *   - cffi: parsed by cusedev.uapi after cdefs/types.h.
 * Hence no include guard, no #include, no function-like macros and no
 * attributes below: cffi's cdef() has no preprocessor and accepts only
 * "#define NAME <integer literal>".
 *
 * The ioctl numbers are not defined here because they need _IO(); the
 * kernel header defines each one as
 *     #define LIVEUPDATE_IOCTL_<X>  _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_<X>)
 * and cusedev.uapi computes them the same way (uapi.IO()).
 *
 * General ioctl format: every argument struct starts with "__u32 size", the
 * caller's sizeof() of the struct; the kernel requires any bytes past what it
 * understands to be zero, so the structs can grow (iommufd convention).
 */

/*
 * enum liveupdate_state - state of the live update orchestrator (global) and
 * of each preserved file.
 * @LIVEUPDATE_STATE_UNDEFINED: not yet initialized.
 * @LIVEUPDATE_STATE_NORMAL:    default; no live update in progress.
 * @LIVEUPDATE_STATE_PREPARED:  PREPARE callbacks completed; ready for reboot.
 * @LIVEUPDATE_STATE_FROZEN:    FREEZE sent from reboot(); kexec is imminent.
 * @LIVEUPDATE_STATE_UPDATED:   running the next kernel, awaiting FINISH.
 */
enum liveupdate_state {
	LIVEUPDATE_STATE_UNDEFINED = 0,
	LIVEUPDATE_STATE_NORMAL = 1,
	LIVEUPDATE_STATE_PREPARED = 2,
	LIVEUPDATE_STATE_FROZEN = 3,
	LIVEUPDATE_STATE_UPDATED = 4,
};

/*
 * enum liveupdate_event - events that trigger live update callbacks.
 * @LIVEUPDATE_PREPARE: before the blackout window; serialize state.
 * @LIVEUPDATE_FREEZE:  from reboot(), the last chance to save state.
 * @LIVEUPDATE_FINISH:  in the new kernel, after restoration; clean up.
 * @LIVEUPDATE_CANCEL:  abort a prepare/freeze and go back to normal.
 */
enum liveupdate_event {
	LIVEUPDATE_PREPARE = 0,
	LIVEUPDATE_FREEZE = 1,
	LIVEUPDATE_FINISH = 2,
	LIVEUPDATE_CANCEL = 3,
};

/* The ioctl type, documented in ioctl-number.rst */
#define LIVEUPDATE_IOCTL_TYPE 0xBA

/* The ioctl commands (the _IOC_NR part of each ioctl number) */
enum {
	LIVEUPDATE_CMD_BASE = 0x00,
	LIVEUPDATE_CMD_FD_PRESERVE = LIVEUPDATE_CMD_BASE,
	LIVEUPDATE_CMD_FD_UNPRESERVE = 0x01,
	LIVEUPDATE_CMD_FD_RESTORE = 0x02,
	LIVEUPDATE_CMD_GET_STATE = 0x03,
	LIVEUPDATE_CMD_SET_EVENT = 0x04,
	LIVEUPDATE_CMD_GET_FD_STATE = 0x05,
	LIVEUPDATE_CMD_SET_FD_EVENT = 0x06,
};

/*
 * struct liveupdate_ioctl_fd_preserve - ioctl(LIVEUPDATE_IOCTL_FD_PRESERVE)
 * @size:  Input; sizeof(struct liveupdate_ioctl_fd_preserve)
 * @fd:    Input; the user-space file descriptor to be preserved.
 * @token: Input; an opaque, unique token for the preserved resource.
 */
struct liveupdate_ioctl_fd_preserve {
	__u32		size;
	__s32		fd;
	__aligned_u64	token;
};

/*
 * struct liveupdate_ioctl_fd_unpreserve - ioctl(LIVEUPDATE_IOCTL_FD_UNPRESERVE)
 * @size:  Input; sizeof(struct liveupdate_ioctl_fd_unpreserve)
 * @token: Input; the token of the resource to unpreserve.
 */
struct liveupdate_ioctl_fd_unpreserve {
	__u32		size;
	__aligned_u64	token;
};

/*
 * struct liveupdate_ioctl_fd_restore - ioctl(LIVEUPDATE_IOCTL_FD_RESTORE)
 * @size:  Input; sizeof(struct liveupdate_ioctl_fd_restore)
 * @fd:    Output; the new file descriptor of the restored resource.
 * @token: Input; the token used to preserve the resource.
 */
struct liveupdate_ioctl_fd_restore {
	__u32		size;
	__s32		fd;
	__aligned_u64	token;
};

/*
 * struct liveupdate_ioctl_get_state - ioctl(LIVEUPDATE_IOCTL_GET_STATE)
 * @size:  Input; sizeof(struct liveupdate_ioctl_get_state)
 * @state: Output; the current global live update state.
 */
struct liveupdate_ioctl_get_state {
	__u32	size;
	__u32	state;
};

/*
 * struct liveupdate_ioctl_set_event - ioctl(LIVEUPDATE_IOCTL_SET_EVENT)
 * @size:  Input; sizeof(struct liveupdate_ioctl_set_event)
 * @event: Input; the global live update event (enum liveupdate_event).
 */
struct liveupdate_ioctl_set_event {
	__u32	size;
	__u32	event;
};

/*
 * struct liveupdate_ioctl_get_fd_state - ioctl(LIVEUPDATE_IOCTL_GET_FD_STATE)
 * @size:     Input; sizeof(struct liveupdate_ioctl_get_fd_state)
 * @incoming: Input; 1: look in the incoming (previous kernel's) set,
 *            0: look in the outgoing set.
 * @token:    Input; token of the file to query.
 * @state:    Output; the live update state of that file.
 */
struct liveupdate_ioctl_get_fd_state {
	__u32		size;
	__u8		incoming;
	__aligned_u64	token;
	__u32		state;
};

/*
 * struct liveupdate_ioctl_set_fd_event - ioctl(LIVEUPDATE_IOCTL_SET_FD_EVENT)
 * @size:  Input; sizeof(struct liveupdate_ioctl_set_fd_event)
 * @event: Input; the event (enum liveupdate_event) for this file.
 * @token: Input; token of the file.
 */
struct liveupdate_ioctl_set_fd_event {
	__u32		size;
	__u32		event;
	__aligned_u64	token;
};
