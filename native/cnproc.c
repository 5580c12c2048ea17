// SPDX-License-Identifier: MIT
/*
 * Native fast path of monitor.sources.netlink: drain the proc-connector socket
 * with recvmmsg, decode exactly like monitor/sources/cnproc.py:decode() and drop
 * the events of unwatched thread groups before Python ever sees them.
 *
 * Built with cffi (native/build.py) into monitor._cnproc_native.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* recvmmsg; Python.h defines it already */
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

/*
 * One proc-connector message, as laid out on the wire (all host-endian):
 *   include/uapi/linux/netlink.h   struct nlmsghdr   @0   len u32, type u16, ...
 *   include/uapi/linux/connector.h struct cn_msg     @16  idx u32, val u32, seq u32 @24, ...
 *   include/uapi/linux/cn_proc.h   struct proc_event @36  what u32, cpu u32 @40,
 *                                  timestamp_ns u64 @44 (not 8-aligned here),
 *                                  event_data: six 32-bit words @52
 */
#define NL_HDRLEN	16	/* NLMSG_HDRLEN */
#define NL_DONE		3	/* NLMSG_DONE, include/uapi/linux/netlink.h */
#define CN_IDX_PROC	1	/* include/uapi/linux/connector.h */
#define CN_VAL_PROC	1
#define OFF_TYPE	4
#define OFF_IDX		16
#define OFF_VAL		20
#define OFF_SEQ		24
#define OFF_WHAT	36
#define OFF_CPU		40
#define OFF_TS		44
#define OFF_DATA	52
#define MESSAGE_SIZE	76

/* enum what, include/uapi/linux/cn_proc.h */
#define PROC_EVENT_NONE	0x00000000u
#define PROC_EVENT_FORK	0x00000001u
#define PROC_EVENT_EXEC	0x00000002u
#define PROC_EVENT_EXIT	0x80000000u

#define PID_MAX_LIMIT	(4 * 1024 * 1024)	/* include/linux/threads.h, 64-bit */
#define BATCH		64			/* datagrams per recvmmsg */
#define DGRAM_SIZE	8192

/* A decoded record; monitor/sources/native.py unpacks it as "=III4xQ6i". */
struct cn_record {
	uint32_t seq;
	uint32_t what;
	uint32_t cpu;
	uint64_t timestamp_ns;
	int32_t d[6];
};
_Static_assert(offsetof(struct cn_record, timestamp_ns) == 16, "cn_record layout");
_Static_assert(sizeof(struct cn_record) == 48, "cn_record layout");

struct cn_state {
	uint8_t *bitmap;	/* watched tgids */
	uint8_t *tree;		/* watched tgids whose new children are watched too */
	uint32_t nbits;
	int all_events;
	int pending_err;	/* an error met after records were already written */
	uint64_t received;	/* messages decoded, kept or not: how busy the socket is */
	/* the last recvmmsg batch, and where decoding stopped in it */
	unsigned int count, next;
	size_t off;
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	uint8_t bufs[BATCH][DGRAM_SIZE];
};

static uint32_t get_u32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static uint16_t get_u16(const uint8_t *p)
{
	uint16_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static void unpack(const uint8_t *p, struct cn_record *r)
{
	r->seq = get_u32(p + OFF_SEQ);
	r->what = get_u32(p + OFF_WHAT);
	r->cpu = get_u32(p + OFF_CPU);
	memcpy(&r->timestamp_ns, p + OFF_TS, sizeof(r->timestamp_ns));
	memcpy(r->d, p + OFF_DATA, sizeof(r->d));
}

static int bit(const uint8_t *map, uint32_t nbits, int32_t tgid)
{
	return tgid >= 0 && (uint32_t)tgid < nbits && (map[tgid >> 3] >> (tgid & 7) & 1);
}

static void set_bit(uint8_t *map, uint32_t nbits, int32_t tgid)
{
	if (tgid >= 0 && (uint32_t)tgid < nbits)
		map[tgid >> 3] |= 1u << (tgid & 7);
}

/*
 * The policy's filter: acks, and fork/exec/exit of watched thread groups (d1).
 * A new process forked by a tree-watched parent is watched (as a tree) from here
 * on, at once: its own exec and forks may be in this very batch, before Python
 * has seen the fork and asked for it.
 */
static int keep(struct cn_state *st, const struct cn_record *r)
{
	if (!st || st->all_events)
		return 1;
	switch (r->what) {
	case PROC_EVENT_NONE:
		return 1;
	case PROC_EVENT_FORK:	/* d1 = parent_tgid, d2 = child_pid, d3 = child_tgid */
		if (r->d[2] == r->d[3] && bit(st->tree, st->nbits, r->d[1])) {
			set_bit(st->bitmap, st->nbits, r->d[3]);
			set_bit(st->tree, st->nbits, r->d[3]);
		}
		return bit(st->bitmap, st->nbits, r->d[1]);
	case PROC_EVENT_EXEC:	/* d1 = process_tgid */
	case PROC_EVENT_EXIT:	/* d1 = process_tgid */
		return bit(st->bitmap, st->nbits, r->d[1]);
	default:
		return 0;
	}
}

/*
 * Decode the messages of one datagram from *off on into out (at most max), as
 * cnproc.decode() does; st == NULL means no filtering. Advances *off past what
 * was consumed, and sets it to len once the datagram is done.
 */
static size_t decode_from(struct cn_state *st, const uint8_t *buf,
			  size_t len, size_t *off, struct cn_record *out,
			  size_t max)
{
	size_t n = 0;

	if (len == MESSAGE_SIZE) {	/* the kernel's one message per datagram */
		if (max && *off == 0) {
			unpack(buf, out);
			if (st)
				st->received++;
			n = keep(st, out);
			*off = len;
		}
		return n;
	}
	while (n < max && *off + NL_HDRLEN <= len) {
		const uint8_t *p = buf + *off;
		size_t msg_len = get_u32(p);

		if (msg_len < NL_HDRLEN)
			break;
		if (get_u16(p + OFF_TYPE) == NL_DONE &&
		    msg_len >= MESSAGE_SIZE && *off + MESSAGE_SIZE <= len &&
		    get_u32(p + OFF_IDX) == CN_IDX_PROC &&
		    get_u32(p + OFF_VAL) == CN_VAL_PROC) {
			unpack(p, out + n);
			if (st)
				st->received++;
			n += keep(st, out + n);
		}
		*off += (msg_len + 3) & ~(size_t)3;	/* NLMSG_ALIGN */
	}
	if (n < max || *off + NL_HDRLEN > len)
		*off = len;	/* nothing more to find in it */
	return n;
}

struct cn_state *cn_new(int all_events)
{
	struct cn_state *st = calloc(1, sizeof(*st));
	unsigned long pid_max = 0;
	FILE *f;

	if (!st)
		return NULL;
	/* the bitmap grows in cn_watch should pid_max be raised later */
	f = fopen("/proc/sys/kernel/pid_max", "re");
	if (!f || fscanf(f, "%lu", &pid_max) != 1)
		pid_max = 32768;
	if (f)
		fclose(f);
	if (pid_max > PID_MAX_LIMIT)
		pid_max = PID_MAX_LIMIT;
	st->nbits = (uint32_t)(pid_max + 7) & ~7u;
	st->bitmap = calloc(st->nbits / 8, 1);
	st->tree = calloc(st->nbits / 8, 1);
	if (!st->bitmap || !st->tree) {
		free(st->bitmap);
		free(st->tree);
		free(st);
		return NULL;
	}
	st->all_events = !!all_events;
	for (int i = 0; i < BATCH; i++) {
		st->iov[i].iov_base = st->bufs[i];
		st->iov[i].iov_len = DGRAM_SIZE;
		st->msgs[i].msg_hdr.msg_iov = &st->iov[i];
		st->msgs[i].msg_hdr.msg_iovlen = 1;
	}
	return st;
}

void cn_free(struct cn_state *st)
{
	if (st) {
		free(st->bitmap);
		free(st->tree);
	}
	free(st);
}

static int grow(uint8_t **map, uint32_t old_bits, uint32_t nbits)
{
	uint8_t *bigger = realloc(*map, nbits / 8);

	if (!bigger)
		return -ENOMEM;
	memset(bigger + old_bits / 8, 0, (nbits - old_bits) / 8);
	*map = bigger;
	return 0;
}

/* Watch a thread group; with tree, the processes it forks are watched too. */
int cn_watch(struct cn_state *st, int32_t tgid, int tree)
{
	if (tgid < 0 || tgid >= PID_MAX_LIMIT)
		return -EINVAL;
	if ((uint32_t)tgid >= st->nbits) {
		uint32_t nbits = ((uint32_t)tgid + 1 + 8191) & ~8191u;

		if (grow(&st->bitmap, st->nbits, nbits) || grow(&st->tree, st->nbits, nbits))
			return -ENOMEM;	/* a grown first map is harmless: its size is only a capacity */
		st->nbits = nbits;
	}
	set_bit(st->bitmap, st->nbits, tgid);
	if (tree)
		set_bit(st->tree, st->nbits, tgid);
	return 0;
}

void cn_unwatch(struct cn_state *st, int32_t tgid)
{
	if (tgid >= 0 && (uint32_t)tgid < st->nbits) {
		st->bitmap[tgid >> 3] &= (uint8_t)~(1u << (tgid & 7));
		st->tree[tgid >> 3] &= (uint8_t)~(1u << (tgid & 7));
	}
}

/*
 * Drain the socket into out until EAGAIN or max records. ENOBUFS (the kernel
 * dropped messages; reported once, the socket goes on) sets *overrun. Returns
 * the number of records written, or -errno. A datagram left half decoded when
 * out filled up is resumed on the next call, so nothing received is lost.
 */
int cn_drain(struct cn_state *st, int fd, struct cn_record *out, int max,
	     int *overrun)
{
	size_t n = 0, room = max > 0 ? (size_t)max : 0;
	unsigned int want;
	int ret, drained = 0;

	if (st->pending_err) {
		ret = -st->pending_err;
		st->pending_err = 0;
		return ret;
	}
	for (;;) {
		while (st->next < st->count && n < room) {
			struct mmsghdr *m = &st->msgs[st->next];

			n += decode_from(st, st->bufs[st->next], m->msg_len,
					 &st->off, out + n, room - n);
			if (st->off >= m->msg_len) {
				st->next++;
				st->off = 0;
			}
		}
		if (n >= room || drained)
			break;
		want = room - n < BATCH ? (unsigned int)(room - n) : BATCH;
		ret = recvmmsg(fd, st->msgs, want, MSG_DONTWAIT, NULL);
		if (ret < 0) {
			if (errno == ENOBUFS) {
				*overrun = 1;
				continue;
			}
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			if (!n)
				return -errno;
			st->pending_err = errno;	/* hand over what we have first */
			break;
		}
		st->count = ret;
		st->next = 0;
		st->off = 0;
		/* Fewer than asked: the queue was empty, or an error stopped the batch
		 * (net/socket.c, do_recvmmsg: it returns the datagrams so far and keeps
		 * any error but EAGAIN in sk_err for the next call). Another recvmmsg
		 * would only say EAGAIN, one syscall more per wake-up; what arrives
		 * later, or the kept error, wakes the caller's poll again. */
		drained = (unsigned int)ret < want;
	}
	return (int)n;
}

/* Messages decoded since cn_new, kept or dropped by the filter. */
uint64_t cn_received(struct cn_state *st)
{
	return st->received;
}

/* Decode one datagram without filtering: cnproc.decode() in C, for the tests. */
int cn_decode(const uint8_t *buf, size_t len, struct cn_record *out, int max)
{
	size_t off = 0;

	return (int)decode_from(NULL, buf, len, &off, out, max > 0 ? max : 0);
}

/*
 * include/uapi/linux/pidfd.h: struct pidfd_info up to PIDFD_INFO_SIZE_VER0 (64
 * bytes); the kernel takes any size >= VER0, and the size is in the ioctl number.
 * Defined here since older uapi headers lack it.
 */
struct cn_pidfd_info {
	uint64_t mask;
	uint64_t cgroupid;
	uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
	int32_t exit_code;
};
_Static_assert(sizeof(struct cn_pidfd_info) == 64, "PIDFD_INFO_SIZE_VER0");

#define CN_PIDFD_INFO_EXIT	(1ULL << 3)
#define CN_PIDFD_GET_INFO	_IOWR(0xFF, 11, struct cn_pidfd_info)

/* 1 and the raw wait status once the kernel has it (Linux >= 6.15), 0, or -errno. */
int pidfd_exit_status(int pidfd, int *status)
{
	struct cn_pidfd_info info = { .mask = CN_PIDFD_INFO_EXIT };

	if (ioctl(pidfd, CN_PIDFD_GET_INFO, &info) < 0)
		return -errno;
	if (!(info.mask & CN_PIDFD_INFO_EXIT))
		return 0;
	*status = info.exit_code;
	return 1;
}
