/* Fork churn helper: fork+exit pairs on demand, one after another.
 *
 * usage: churner
 * Prints "READY <pid>". Each line "N [USEC]" on stdin: N times fork() a child
 * that _exit(0)s at once, reap it, and pause USEC microseconds (default 0),
 * then print "DONE N". EOF ends it. It has no child left when it answers, so
 * nothing outlives it unreaped.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
	char line[64];

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("READY %d\n", (int)getpid());
	while (fgets(line, sizeof(line), stdin)) {
		char *rest;
		long n = strtol(line, &rest, 10);
		long pause_us = strtol(rest, NULL, 10);

		for (long i = 0; i < n; i++) {
			pid_t pid = fork();

			if (pid < 0) {
				printf("ERR fork failed after %ld\n", i);
				return 1;
			}
			if (pid == 0)
				_exit(0);
			while (waitpid(pid, NULL, 0) < 0)
				;
			if (pause_us > 0)
				usleep((useconds_t)pause_us);
		}
		printf("DONE %ld\n", n);
	}
	return 0;
}
