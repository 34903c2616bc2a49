#!/bin/sh
# Slurm TaskProlog: point every task of a job at this node's token.
#
# slurm.conf:  TaskProlog=/etc/slurm/token-sidecar-task-prolog.sh
#
# Slurm runs it as the job's user before each task, and puts each
# "export NAME=value" line it prints into the task's environment. It
# never fails a task: a user who may not take the token (not in
# tokenusers) gets no variables, and a variable the job set already is
# left alone.
#
# BEARER_TOKEN_FILE names the file the sidecar rewrites at every refresh
# (WLCG bearer-token discovery reads it first), so even a job that runs
# for days reads a valid token: read the file at each use, do not copy
# it. TOKEN_SIDECAR_SOCKET is for "token-sidecar token --socket" and
# "curl --unix-socket".

token_file=${TOKEN_SIDECAR_TOKEN_FILE:-/run/token-sidecar/bearer_token}
socket=${TOKEN_SIDECAR_SOCKET:-/run/token-sidecar/token.sock}

if [ -z "${BEARER_TOKEN_FILE:-}" ] && [ -f "$token_file" ] &&
    [ -r "$token_file" ]; then
    echo "export BEARER_TOKEN_FILE=$token_file"
fi
if [ -S "$socket" ] && [ -w "$socket" ]; then
    echo "export TOKEN_SIDECAR_SOCKET=$socket"
fi

exit 0
