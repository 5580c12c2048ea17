/* Scale helper: N idle children to watch, all killed and reaped on SIGTERM.
 *
 * usage: spawner N
 * Forks N children that pause() forever and prints their PIDs, one per line,
 * then "READY".  On SIGTERM (or EOF on stdin) it SIGKILLs every child, reaps
 * them all and prints "DONE <reaped>"; a SIGTERM while still forking stops the
 * forking first.  Either way no child outlives it unreaped.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	pid_t *kids;
	int n, i, reaped = 0;
	char c;

	if (argc != 2) {
		fprintf(stderr, "usage: spawner N\n");
		return 2;
	}
	n = atoi(argv[1]);
	kids = calloc(n, sizeof *kids);
	if (!kids)
		return 1;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_term;  /* no SA_RESTART: the read below must return */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	for (i = 0; i < n && !stop; i++) {
		kids[i] = fork();
		if (kids[i] < 0) {
			perror("fork");
			break;
		}
		if (kids[i] == 0) {
			signal(SIGTERM, SIG_DFL);
			signal(SIGINT, SIG_DFL);
			close(0);
			for (;;)
				pause();
		}
		printf("%d\n", kids[i]);
	}
	n = i;
	printf("READY\n");
	fflush(stdout);
	while (!stop && read(0, &c, 1) != 0)
		;
	for (i = 0; i < n; i++)
		kill(kids[i], SIGKILL);
	while (reaped < n) {
		if (waitpid(-1, NULL, 0) > 0)
			reaped++;
		else if (errno == ECHILD)
			break;
	}
	printf("DONE %d\n", reaped);
	return 0;
}
