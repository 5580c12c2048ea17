/* Storm generator: fork and reap short-lived children as fast as possible.
 *
 * usage: storm SECONDS PIDFILE
 * Prints "READY", waits for one byte on stdin (so several generators and the
 * listeners start together), then for SECONDS forks a child that _exit(0)s at
 * once and reaps it, recording every child PID.  At the end it writes the PIDs
 * (native int32) to PIDFILE and prints "DONE <forks> <elapsed_ns>".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	size_t n = 0, cap = 1 << 16;
	int32_t *pids;
	int64_t start, end;
	FILE *out;
	char c;

	if (argc != 3) {
		fprintf(stderr, "usage: storm SECONDS PIDFILE\n");
		return 2;
	}
	pids = malloc(cap * sizeof *pids);
	if (!pids)
		return 1;
	printf("READY\n");
	fflush(stdout);
	if (read(0, &c, 1) != 1)
		return 1;
	start = now_ns();
	end = start + (int64_t)(atof(argv[1]) * 1e9);
	while (now_ns() < end) {
		pid_t pid = fork();

		if (pid == 0)
			_exit(0);
		if (pid < 0) {
			perror("fork");
			break;
		}
		/* Reap at once: PID 1 here does not reap, and zombies would pin PIDs. */
		while (waitpid(pid, NULL, 0) < 0)
			;
		if (n == cap) {
			cap *= 2;
			pids = realloc(pids, cap * sizeof *pids);
			if (!pids)
				return 1;
		}
		pids[n++] = pid;
	}
	start = now_ns() - start;
	out = fopen(argv[2], "wb");
	if (!out || fwrite(pids, sizeof *pids, n, out) != n || fclose(out)) {
		perror(argv[2]);
		return 1;
	}
	printf("DONE %zu %lld\n", n, (long long)start);
	return 0;
}
