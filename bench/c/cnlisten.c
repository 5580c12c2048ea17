/* The floor: a minimal C proc-connector listener.
 *
 * usage: cnlisten lat            latency mode
 *        cnlisten storm PIDFILE  storm mode
 *
 * Both modes subscribe with the Linux >= 6.6 `struct proc_input` exit-only mask
 * and a 16 MiB SO_RCVBUFFORCE buffer, confirm the subscription by seeing their
 * own probe child's exit (the mask filters the ACK out), then print "READY".
 *
 * lat:   a thread reads "W <pid>" lines from stdin, marks the PID watched and
 *        answers "W <pid>"; the main thread is a blocking recv() loop that stamps
 *        CLOCK_MONOTONIC right after recv() returns and, for a watched PID, prints
 *        "E <pid> <recv_ns> <kernel_ns>".  EOF on stdin ends it.
 * storm: counts exit messages and records every exiting thread-group leader;
 *        SIGTERM ends it: it drains what is queued, writes the leader PIDs
 *        (int32) to PIDFILE and prints "DONE <exits> <msgs> <enobufs> <cpu_us>".
 *        "READY" carries the CPU used so far, so setup can be subtracted.
 */
#include <errno.h>
#include <linux/connector.h>
#include <linux/netlink.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROC_CN_MCAST_LISTEN 1
#define PROC_EVENT_EXIT 0x80000000u
#define RCVBUF (16 << 20)
#define MAX_WATCH 64

/* include/uapi/linux/cn_proc.h (6.6+); Debian 12's headers predate it. */
struct proc_input {
	uint32_t mcast_op;
	uint32_t event_type;
};

/* struct proc_event, as far as the exit event goes */
struct exit_event {
	uint32_t what;
	uint32_t cpu;
	uint64_t timestamp_ns;
	int32_t pid, tgid, exit_code, exit_signal, ppid, ptgid;
} __attribute__((packed));

static volatile sig_atomic_t stop;
static int watched[MAX_WATCH];  /* 0 = free slot; touched with __atomic ops */
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long cpu_us(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000L + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

static int open_connector(void)
{
	struct sockaddr_nl addr = { .nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC };
	struct {
		struct nlmsghdr nl;
		struct cn_msg cn;
		struct proc_input in;
	} __attribute__((packed)) req;
	int fd, size = RCVBUF;

	fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR);
	if (fd < 0) {
		perror("proc connector");
		exit(1);
	}
	/* FORCE needs CAP_NET_ADMIN; without it the kernel caps the size at rmem_max. */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
	if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		perror("bind to the proc connector");
		exit(1);
	}
	memset(&req, 0, sizeof req);
	req.nl.nlmsg_len = sizeof req;
	req.nl.nlmsg_type = NLMSG_DONE;
	req.cn.id.idx = CN_IDX_PROC;
	req.cn.id.val = CN_VAL_PROC;
	req.cn.len = sizeof req.in;
	req.in.mcast_op = PROC_CN_MCAST_LISTEN;
	req.in.event_type = PROC_EVENT_EXIT;
	if (send(fd, &req, sizeof req, 0) < 0) {
		perror("subscribe");
		exit(1);
	}
	return fd;
}

/* The exit event in one datagram, or NULL (the kernel sends one message each). */
static const struct exit_event *exit_of(const char *buf, ssize_t len)
{
	const struct nlmsghdr *nl = (const void *)buf;
	const struct cn_msg *cn;
	const struct exit_event *ev;

	if (len < (ssize_t)(NLMSG_HDRLEN + sizeof *cn + sizeof *ev) || nl->nlmsg_type != NLMSG_DONE)
		return NULL;
	cn = NLMSG_DATA(nl);
	if (cn->id.idx != CN_IDX_PROC || cn->id.val != CN_VAL_PROC)
		return NULL;
	ev = (const void *)cn->data;
	return ev->what == PROC_EVENT_EXIT ? ev : NULL;
}

/* Fork a child that exits at once and wait (2 s at most) for its exit event. */
static void confirm(int fd)
{
	struct timeval tv = { 2, 0 };
	char buf[8192];
	pid_t probe = fork();

	if (probe == 0)
		_exit(0);
	waitpid(probe, NULL, 0);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		const struct exit_event *ev;

		if (n < 0 && errno == ENOBUFS)
			continue;
		if (n < 0) {
			fprintf(stderr, "no event for the probe: subscription not working\n");
			exit(1);
		}
		ev = exit_of(buf, n);
		if (ev && ev->tgid == probe)
			break;
	}
}

static void say(const char *fmt, long long a, long long b, long long c)
{
	pthread_mutex_lock(&out_lock);
	printf(fmt, a, b, c);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static void *stdin_loop(void *arg)
{
	char line[64];
	int pid, i;

	(void)arg;
	while (fgets(line, sizeof line, stdin)) {
		if (sscanf(line, "W %d", &pid) != 1)
			continue;
		for (i = 0; i < MAX_WATCH; i++) {
			int free_slot = 0;

			if (__atomic_compare_exchange_n(&watched[i], &free_slot, pid, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
				break;
		}
		say("W %lld\n", pid, 0, 0);
	}
	exit(0);  /* EOF: the harness is done with us */
}

static int take_watched(int tgid)
{
	int i;

	for (i = 0; i < MAX_WATCH; i++) {
		int expected = tgid;

		if (__atomic_compare_exchange_n(&watched[i], &expected, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
			return 1;
	}
	return 0;
}

static __attribute__((noreturn)) void latency_mode(int fd)
{
	struct timeval tv = { 0, 0 };
	pthread_t thread;
	char buf[8192];

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);  /* block for good */
	say("READY\n", 0, 0, 0);
	pthread_create(&thread, NULL, stdin_loop, NULL);
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		int64_t t = now_ns();  /* the stamp: right after the wake-up */
		const struct exit_event *ev;

		if (n < 0)
			continue;  /* ENOBUFS: a lost target shows up as a timeout in the harness */
		ev = exit_of(buf, n);
		if (ev && ev->pid == ev->tgid && take_watched(ev->tgid))
			say("E %lld %lld %lld\n", ev->tgid, t, (long long)ev->timestamp_ns);
	}
}

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

static int storm_mode(int fd, const char *path)
{
	struct timeval tv = { 0, 200000 };  /* wake now and then to see `stop` */
	struct sigaction sa;
	size_t n_pids = 0, cap = 1 << 16;
	long long exits = 0, msgs = 0, enobufs = 0;
	int32_t *pids = malloc(cap * sizeof *pids);
	char buf[8192];
	FILE *out;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	say("READY %lld\n", cpu_us(), 0, 0);
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof buf, stop ? MSG_DONTWAIT : 0);
		const struct exit_event *ev;

		if (n < 0) {
			if (errno == ENOBUFS) {
				enobufs++;
				continue;
			}
			if (stop && (errno == EAGAIN || errno == EWOULDBLOCK))
				break;  /* drained */
			continue;  /* EINTR or the timeout */
		}
		msgs++;
		ev = exit_of(buf, n);
		if (!ev)
			continue;
		exits++;
		if (ev->pid != ev->tgid)
			continue;
		if (n_pids == cap) {
			cap *= 2;
			pids = realloc(pids, cap * sizeof *pids);
		}
		pids[n_pids++] = ev->tgid;
	}
	out = fopen(path, "wb");
	if (!out || fwrite(pids, sizeof *pids, n_pids, out) != n_pids || fclose(out)) {
		perror(path);
		return 1;
	}
	printf("DONE %lld %lld %lld %ld\n", exits, msgs, enobufs, cpu_us());
	return 0;
}

int main(int argc, char **argv)
{
	int fd;

	if (argc < 2 || (strcmp(argv[1], "lat") && (strcmp(argv[1], "storm") || argc != 3))) {
		fprintf(stderr, "usage: cnlisten lat | cnlisten storm PIDFILE\n");
		return 2;
	}
	fd = open_connector();
	confirm(fd);
	if (!strcmp(argv[1], "lat"))
		latency_mode(fd);
	return storm_mode(fd, argv[2]);
}
