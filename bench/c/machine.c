/* What this machine charges for the two things every event path does after a quiet
 * spell: touching memory again, and waking a process on another CPU.
 *
 *   machine touch IDLE_MS TRIALS   after IDLE_MS of sleep, the first read of 256
 *                                  distinct 4 KiB pages, of the same 256 at once again,
 *                                  and of 256 pages inside 2 MiB (THP) pages; one line
 *                                  per trial: "T ns_4k ns_again ns_huge huge_kib"
 *   machine wake SAME TRIALS       a child blocked in read(2) on a pipe, on the other
 *                                  CPU (SAME=0) or this one (1); after 5 ms of quiet we
 *                                  write a byte: "W ns_in_write ns_to_read_return"
 *
 * A page walk after the TLB was emptied (a vCPU that halted may come back to a TLB the
 * host has flushed) costs per 4 KiB page; within a huge page it is one walk for 512.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGES 256
#define HUGE (2UL << 20)

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void quiet(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };

	nanosleep(&ts, NULL);
}

static char *region(size_t len, int advice)
{
	char *p = mmap(NULL, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	p = (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
	madvise(p, len, advice);
	memset(p, 1, len);
	return p;
}

static long huge_kib(void)
{
	char line[256];
	long kib = 0;
	FILE *f = fopen("/proc/self/smaps_rollup", "r");

	while (f && fgets(line, sizeof line, f))
		if (sscanf(line, "AnonHugePages: %ld kB", &kib) == 1)
			break;
	if (f)
		fclose(f);
	return kib;
}

static int64_t touch(volatile char *p, size_t stride)
{
	int64_t t0 = now_ns();
	int sum = 0;

	for (size_t i = 0; i < PAGES; i++)
		sum += p[i * stride];
	(void)sum;
	return now_ns() - t0;
}

static int do_touch(int idle_ms, int trials)
{
	size_t len = PAGES * 4096UL;
	/* 4 KiB pages, spread over 256 of them; and 256 pages inside huge pages. */
	char *small = region(len, MADV_NOHUGEPAGE);
	char *huge = region(HUGE, MADV_HUGEPAGE);
	long kib = huge_kib();

	for (int t = 0; t < trials; t++) {
		quiet(idle_ms);
		int64_t a = touch(small, 4096);
		int64_t b = touch(small, 4096);

		quiet(idle_ms);
		int64_t c = touch(huge, 4096);

		printf("T %lld %lld %lld %ld\n", (long long)a, (long long)b, (long long)c, kib);
	}
	return 0;
}

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof set, &set);
}

static int do_wake(int same, int trials)
{
	int ping[2], pong[2];
	pid_t child;

	if (pipe(ping) || pipe(pong))
		return 2;
	child = fork();
	if (child == 0) {
		char c;
		int64_t t;

		close(ping[1]);
		close(pong[0]);
		pin(same ? 0 : 1);
		while (read(ping[0], &c, 1) == 1) {
			t = now_ns();
			if (write(pong[1], &t, sizeof t) != sizeof t)
				_exit(3);
		}
		_exit(0);
	}
	close(ping[0]);
	close(pong[1]);
	pin(0);
	for (int i = 0; i < trials; i++) {
		int64_t t0, t1, woke;

		quiet(5);
		t0 = now_ns();
		if (write(ping[1], "x", 1) != 1)
			return 3;
		t1 = now_ns();
		if (read(pong[0], &woke, sizeof woke) != sizeof woke)
			return 4;
		printf("W %lld %lld\n", (long long)(t1 - t0), (long long)(woke - t0));
	}
	close(ping[1]);
	waitpid(child, NULL, 0);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 4 && !strcmp(argv[1], "touch"))
		return do_touch(atoi(argv[2]), atoi(argv[3]));
	if (argc == 4 && !strcmp(argv[1], "wake"))
		return do_wake(atoi(argv[2]), atoi(argv[3]));
	fprintf(stderr, "usage: machine touch IDLE_MS TRIALS | machine wake SAME TRIALS\n");
	return 2;
}
