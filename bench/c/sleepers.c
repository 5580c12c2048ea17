/* The watched processes of the storm: N children that exit at random times.
 *
 * usage: sleepers N SECONDS SEED
 * Forks N children, prints their PIDs (one line, space separated), then waits
 * for one byte on stdin.  At that "go" every child is released at once (the
 * pipe they block on is closed) and sleeps its own random delay within
 * [5%, 85%] of SECONDS before _exit(0).  The parent reaps each child as it
 * dies (zombies would still read as alive to some checks) and prints "DONE".
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int gate[2], n, i, reaped = 0;
	double seconds;
	char c;

	if (argc != 4) {
		fprintf(stderr, "usage: sleepers N SECONDS SEED\n");
		return 2;
	}
	n = atoi(argv[1]);
	seconds = atof(argv[2]);
	srand((unsigned)atoi(argv[3]));
	if (pipe(gate) < 0)
		return 1;
	for (i = 0; i < n; i++) {
		double delay = seconds * (0.05 + 0.80 * rand() / (double)RAND_MAX);
		pid_t pid = fork();

		if (pid < 0) {
			perror("fork");
			break;
		}
		if (pid == 0) {
			struct timespec ts = { (time_t)delay, (long)((delay - (time_t)delay) * 1e9) };

			close(gate[1]);
			close(0);
			while (read(gate[0], &c, 1) < 0 && errno == EINTR)
				;
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
				;
			_exit(0);
		}
		printf("%d ", pid);
	}
	printf("\n");
	fflush(stdout);
	n = i;
	close(gate[0]);
	/* Go on the first byte, or on EOF: either way the children must not outlive us. */
	if (read(0, &c, 1) < 0)
		perror("read");
	close(gate[1]);
	while (reaped < n) {
		if (waitpid(-1, NULL, 0) > 0)
			reaped++;
		else if (errno == ECHILD)
			break;
	}
	printf("DONE %d\n", reaped);
	return 0;
}
