/* The latency target: block until released, stamp the time, report it, exit.
 *
 * Reads one byte from stdin (the release), takes CLOCK_MONOTONIC, writes the
 * 8-byte timestamp to stdout (a pipe its parent reads after reaping it) and
 * _exit(0)s.  The stamp is the last thing before the exit path, so what is
 * measured is "process decided to exit" -> "listener knows".
 */
#include <stdint.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
	char c;
	struct timespec ts;
	int64_t t;

	if (read(0, &c, 1) != 1)
		_exit(2);
	clock_gettime(CLOCK_MONOTONIC, &ts);
	t = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
	if (write(1, &t, sizeof t) != sizeof t)
		_exit(3);
	_exit(0);
}
