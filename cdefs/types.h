/*
 * cffi-only prelude for cusedev's cdefs.  NOT for C compilers.
 *
 * cffi knows the <stdint.h> names natively but not the kernel's <linux/types.h>
 * spellings, so this file teaches them to cffi.  A C program must include
 * <linux/types.h> (and <stdint.h>) instead: there __aligned_u64 is a macro
 * carrying __attribute__((aligned(8))), which cffi cannot parse.  The plain
 * typedef below has the same layout wherever uint64_t is already 8-byte
 * aligned inside structs (x86_64, arm64, riscv64, ...); cusedev.uapi checks
 * the resulting LUO layouts at import and refuses to run where it is not
 * (e.g. i386, where a bare u64 member is only 4-byte aligned).
 *
 * Keep this file free of preprocessor directives other than
 * "#define NAME <integer literal>": cffi's cdef() has no preprocessor.
 */
typedef uint8_t  __u8;
typedef int8_t   __s8;
typedef uint16_t __u16;
typedef int16_t  __s16;
typedef uint32_t __u32;
typedef int32_t  __s32;
typedef uint64_t __u64;
typedef int64_t  __s64;
typedef uint64_t __aligned_u64;
