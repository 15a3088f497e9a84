/*
 * pam_standin: the PAM half of the RDS IAM stand-in used by aws-pgbouncer's tests.
 *
 * PostgreSQL (pg_hba "pam pamservice=aws-pgbouncer-standin") hands the client's password to
 * PAM. This module takes it with pam_get_authtok and writes it to the stdin of a verifier
 * (the module arguments: program and its arguments), with the user in PAM_USER.
 * Authentication succeeds only when the verifier exits 0.
 *
 * pam_exec would do, except that it passes at most 511 bytes of the password, and RDS IAM
 * tokens signed with session credentials run to 1-2 KB.
 *
 * TEST-ONLY: never install this on a machine that authenticates anything real.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <security/pam_ext.h>
#include <security/pam_modules.h>

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    const char *user = NULL;
    const char *authtok = NULL;
    char received_at[32] = "";
    char **child_argv;
    int pipefd[2];
    pid_t pid;
    int status, i;
    (void)flags;

    if (argc < 1) {
        pam_syslog(pamh, LOG_ERR, "pam_standin: no verifier given");
        return PAM_SERVICE_ERR;
    }
    if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || user == NULL)
        return PAM_USER_UNKNOWN;
    if (pam_get_authtok(pamh, PAM_AUTHTOK, &authtok, NULL) != PAM_SUCCESS || authtok == NULL)
        return PAM_AUTH_ERR;
    /* RDS judges a token's expiry when the password arrives; the verifier, a Python process
     * started only now, may take a second to get going on a loaded machine. */
    {
        struct timespec now;
        if (clock_gettime(CLOCK_REALTIME, &now) == 0)
            snprintf(received_at, sizeof(received_at), "%lld.%03ld", (long long)now.tv_sec,
                     now.tv_nsec / 1000000);
    }

    child_argv = calloc((size_t)argc + 1, sizeof(char *));
    if (child_argv == NULL)
        return PAM_BUF_ERR;
    for (i = 0; i < argc; i++)
        child_argv[i] = (char *)argv[i];

    if (pipe2(pipefd, O_CLOEXEC) != 0) {
        free(child_argv);
        return PAM_SYSTEM_ERR;
    }
    pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        free(child_argv);
        return PAM_SYSTEM_ERR;
    }
    if (pid == 0) {
        /* Child: stdin from the pipe, default signal handling, user in the environment
         * (the rest of the environment, STANDIN_VERIFIER_CONFIG included, is inherited). */
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        if (dup2(pipefd[0], STDIN_FILENO) < 0)
            _exit(127);
        if (setenv("PAM_USER", user, 1) != 0)
            _exit(127);
        if (received_at[0] != '\0' && setenv("STANDIN_RECEIVED_AT", received_at, 1) != 0)
            _exit(127);
        execv(child_argv[0], child_argv);
        _exit(127);
    }
    free(child_argv);
    close(pipefd[0]);
    {
        /* The verifier may exit early without reading: ignore SIGPIPE for the write. */
        void (*old)(int) = signal(SIGPIPE, SIG_IGN);
        write_all(pipefd[1], authtok, strlen(authtok));
        signal(SIGPIPE, old);
    }
    close(pipefd[1]);

    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return PAM_SYSTEM_ERR;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return PAM_SUCCESS;
    return PAM_AUTH_ERR;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh;
    (void)flags;
    (void)argc;
    (void)argv;
    return PAM_SUCCESS;
}
