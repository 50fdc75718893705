/* Keeps secrets off tritonserver's command line, where `ps` shows them to every user.

   Preloaded into tritonserver (LD_PRELOAD) by triton/supervisor/access.py. Before main() runs,
   it replaces each placeholder `@NAME@` in the arguments with the first line of a file the
   owner alone reads. The files come from LLM_IN_TRITON_SECRET_ARGS, `NAME=/path:NAME=/path`.
   main() gets the new strings; /proc/<pid>/cmdline keeps showing the placeholders, since it
   reads the original argument memory. Both variables are then removed from the environment,
   so the python backend's stubs neither load this library nor learn where the files are.
   A file that cannot be read stops the server (exit 78) before it listens. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VARIABLE "LLM_IN_TRITON_SECRET_ARGS"

static char *first_line(const char *path) {
    FILE *file = fopen(path, "r");
    if (file == NULL) {
        fprintf(stderr, "secret_args: cannot read %s\n", path);
        _exit(78);
    }
    static char line[4096];
    if (fgets(line, sizeof line, file) == NULL) line[0] = '\0';
    fclose(file);
    line[strcspn(line, "\r\n")] = '\0';
    if (line[0] == '\0') {
        fprintf(stderr, "secret_args: %s is empty\n", path);
        _exit(78);
    }
    return strdup(line);
}

static void substitute(int argc, char **argv, const char *name, const char *value) {
    char mark[256];
    snprintf(mark, sizeof mark, "@%s@", name);
    for (int i = 1; i < argc; i++) {
        char *at = strstr(argv[i], mark);
        if (at == NULL) continue;
        size_t size = strlen(argv[i]) - strlen(mark) + strlen(value) + 1;
        char *filled = malloc(size);
        snprintf(filled, size, "%.*s%s%s", (int)(at - argv[i]), argv[i], value, at + strlen(mark));
        argv[i] = filled;
    }
}

static void fill_arguments(int argc, char **argv, char **envp) {
    (void)envp;
    const char *spec = getenv(VARIABLE);
    if (spec != NULL) {
        char *pairs = strdup(spec), *saved = NULL;
        for (char *pair = strtok_r(pairs, ":", &saved); pair; pair = strtok_r(NULL, ":", &saved)) {
            char *equals = strchr(pair, '=');
            if (equals == NULL) continue;
            *equals = '\0';
            char *value = first_line(equals + 1);
            substitute(argc, argv, pair, value);
        }
        free(pairs);
    }
    unsetenv(VARIABLE);
    unsetenv("LD_PRELOAD");
}

__attribute__((section(".init_array"), used)) static void (*run_first)(int, char **, char **) =
    fill_arguments;
