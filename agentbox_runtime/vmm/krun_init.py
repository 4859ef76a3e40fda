"""What libkrun's init does between mounting the root and running the workload, as busybox code.

The guest's PID 1 (:func:`agentbox_runtime.vmm.krun_guest.pid1_script`) embeds these pieces. The
reference is containers/libkrun v1.18.0 ``init/init.c`` with its bundled ``init/jsmn.h``:

- ``config_parse_file`` reads ``/.krun_config.json`` (crun's krun handler writes the container's
  ``config.json`` there). The file is tokenized by libkrun's jsmn (non-strict; a ``\\uXXXX``
  escape above 127 fails the whole parse; an ASCII one is rewritten in place), then *every*
  string token is compared, case-insensitively (``jsoneq``), with ``Env`` (used only when an array
  follows), ``args``/``Cmd``, ``WorkingDir``/``Cwd`` and ``Entrypoint``; the first match of each
  wins, keys and values alike. ``Entrypoint`` is prepended to the arguments only when both exist.
  Strings are decoded by v1.18.0's ``unescape_string``, which does not step over a simple escape:
  ``\\n`` gives a newline *and* an ``n``, ``\\"`` two quotes, ``\\\\`` a backslash that starts the
  next escape (fixed in v1.19.0); ``\\u00XX`` gives the character. A file that is missing or does
  not parse changes nothing.
- ``config_parse_env``: each ``NAME=value`` item is set without replacing what the kernel command
  line set (``setenv(..., 0)``), except ``HOME`` and ``TERM`` (the kernel's own ``HOME=/`` and
  ``TERM=linux``), which it replaces; items without ``=`` are skipped.
- ``main``: ``KRUN_HOME``/``KRUN_TERM`` replace ``HOME``/``TERM``; the hostname is ``$HOSTNAME``,
  else ``localhost``; the directory is ``$KRUN_WORKDIR``, else the config's (a failed ``chdir`` is
  ignored); the command is ``$KRUN_INIT``, else the config's arguments, else ``/bin/sh``, run
  with ``execvp`` (``$PATH``, glibc's ``/bin:/usr/bin`` without one); "Couldn't execute" on its
  stdout and 127 (not found) or 126 (anything else) when that fails. ``KRUN_*`` variables stay in
  the workload's environment, as upstream. Not emulated: ``KRUN_RLIMITS``, ``KRUN_INIT_PID1``.

The command is looked up as ``execvp`` looks (the image's static busybox would prefer its own
applets to ``$PATH``) and runs through ``env -i`` with exactly init's environment, then a
``busybox sh`` that restores the variables ash touches (``IFS OPTIND PPID PWD OLDPWD SHLVL PATH``)
and ``exec -a``'s the resolved path, so ``argv[0]`` is the one given. ash drops variables whose
names are not shell names; when the environment has one, the path is run by ``env`` itself and
``argv[0]`` is the resolved path instead.
"""

from __future__ import annotations

import re
import shlex

CONFIG_FILE = "/.krun_config.json"
#: glibc's ``confstr(_CS_PATH)``: where ``execvp`` looks when ``PATH`` is unset (init.krun is static glibc).
DEFAULT_SEARCH_PATH = "/bin:/usr/bin"
#: Variables busybox ash sets or changes on start-up; the exec wrapper puts them back as init left them.
ASH_VARS = ("IFS", "OPTIND", "PPID", "PWD", "OLDPWD", "SHLVL", "PATH")
AWK_PATH = "/run/agentbox/krun-init.awk"
CMD_PATH = "/run/agentbox/krun-cmd"
#: A name busybox ash keeps in the environment it passes on; it drops any other.
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The wrapper's last step: run "$1" (the resolved path) with argv[0] "$0".
EXEC_A = 'exec -a "$0" "$@"'
#: The kernel's own environment for init (``init/main.c`` ``envp_init``).
KERNEL_ENV = ("HOME=/", "TERM=linux")

#: Reads ARGV[1] as init.c reads the config; ENVIRON is the environment init started with. Prints shell
#: code: krun_host, krun_wd (when a chdir applies), krun_n (argv[0]), krun_search and krun_run().
AWK_PROGRAM = r"""
function q(s,   out, k, n, ch) {
  out = "\047"; n = length(s)
  for (k = 1; k <= n; k++) { ch = substr(s, k, 1); out = out (ch == "\047" ? "\047\\\047\047" : ch) }
  return out "\047"
}
function newtok(ty, s, e,   t) {
  if (toknext >= MAXTOK) return -1
  t = toknext++; ttype[t] = ty; tstart[t] = s; tend[t] = e; tsize[t] = 0
  return t
}
function jstring(   start0, pos, ch, e, k, v, d) {
  start0 = JPOS
  for (pos = JPOS + 1; pos < len && c[pos] != ""; pos++) {
    ch = c[pos]
    if (ch == "\"") {
      if (newtok(4, start0 + 1, pos) < 0) { JPOS = start0; return -1 }
      JPOS = pos; return 0
    }
    if (ch == "\\" && pos + 1 < len) {
      e = c[++pos]
      if (e == "u") {
        pos++; v = 0
        for (k = 0; k < 4 && pos < len && c[pos] != ""; k++) {
          d = index("0123456789abcdef", tolower(c[pos]))
          if (d == 0) { JPOS = start0; return -2 }
          v = v * 16 + d - 1; pos++
        }
        if (v > 127) { JPOS = start0; return -2 }
        c[--pos] = v ? sprintf("%c", v) : ""
      } else if (index("\"/\\bfrnt", e) == 0 || e == "") { JPOS = start0; return -2 }
    }
  }
  JPOS = start0; return -3
}
function jprim(   pos, ch) {
  for (pos = JPOS; pos < len && c[pos] != ""; pos++) {
    ch = c[pos]
    if (ch == ":" || ch == "\t" || ch == "\r" || ch == "\n" || ch == " " || ch == "," || ch == "]" || ch == "}") break
  }
  if (newtok(8, JPOS, pos) < 0) return -1
  JPOS = pos - 1; return 0
}
function jsmn(   pos, ch, t, k, ty, r) {
  toknext = 0; toksuper = -1; count = 0
  for (pos = 0; pos < len && c[pos] != ""; pos++) {
    ch = c[pos]
    if (ch == "{" || ch == "[") {
      count++
      if ((t = newtok(ch == "{" ? 1 : 2, pos, -1)) < 0) return -1
      if (toksuper != -1) tsize[toksuper]++
      toksuper = t
    } else if (ch == "}" || ch == "]") {
      ty = ch == "}" ? 1 : 2
      for (k = toknext - 1; k >= 0; k--)
        if (tstart[k] != -1 && tend[k] == -1) {
          if (ttype[k] != ty) return -2
          toksuper = -1; tend[k] = pos + 1; break
        }
      if (k == -1) return -2
      for (; k >= 0; k--) if (tstart[k] != -1 && tend[k] == -1) { toksuper = k; break }
    } else if (ch == "\"") {
      JPOS = pos; r = jstring(); pos = JPOS
      if (r < 0) return r
      count++
      if (toksuper != -1) tsize[toksuper]++
    } else if (ch == "\t" || ch == "\r" || ch == "\n" || ch == " ") {
    } else if (ch == ":") {
      toksuper = toknext - 1
    } else if (ch == ",") {
      if (toksuper != -1 && ttype[toksuper] != 1 && ttype[toksuper] != 2)
        for (k = toknext - 1; k >= 0; k--)
          if ((ttype[k] == 1 || ttype[k] == 2) && tstart[k] != -1 && tend[k] == -1) { toksuper = k; break }
    } else {
      JPOS = pos; r = jprim(); pos = JPOS
      if (r < 0) return r
      count++
      if (toksuper != -1) tsize[toksuper]++
    }
  }
  for (k = toknext - 1; k >= 0; k--) if (tstart[k] != -1 && tend[k] == -1) return -3
  return count
}
function jsoneq(t, s,   k, n) {
  n = length(s)
  if (ttype[t] != 4 || tend[t] - tstart[t] != n) return 0
  for (k = 0; k < n; k++) if (c[tstart[t] + k] == "" || tolower(c[tstart[t] + k]) != tolower(substr(s, k + 1, 1))) return 0
  return 1
}
# v1.18.0 unescape_string over W[0..n-1] (W[n]: the byte after the string); the result in O[0..ON-1]
function unesc(n,   val, e) {
  val = 0; ON = 0
  while (val < n) {
    if (W[val] != "\\") { O[ON++] = W[val++]; continue }
    e = W[++val]
    if (e == "n") O[ON++] = "\n"
    else if (e == "t") O[ON++] = "\t"
    else if (e == "r") O[ON++] = "\r"
    else if (e == "b") O[ON++] = "\b"
    else if (e == "f") O[ON++] = "\f"
    else if (e == "\\" || e == "\"" || e == "/") O[ON++] = e
    else if (e == "u") val += 4
  }
}
function cstr(from, to,   k, s) {
  s = ""
  for (k = from; k < to && O[k] != ""; k++) s = s O[k]
  return s
}
function copied(t,   k, n) {
  n = (t < toknext && tstart[t] >= 0) ? tend[t] - tstart[t] : 0
  for (k = 0; k < n; k++) W[k] = c[tstart[t] + k]
  W[n] = ""
  unesc(n)
  return cstr(0, ON)
}
function parse_args(t, A,   k) {
  for (k = 0; k < tsize[t]; k++) A[k] = copied(t + 1 + k)
  return tsize[t] > 0 ? tsize[t] : -1
}
function setenv(name, value, over) {
  if (name == "") return
  if (name in ENVV) { if (over) ENVV[name] = value; return }
  ENVV[name] = value; ENVK[ENVN++] = name
}
function parse_env(t,   k, u, n, s, eq, m) {
  for (k = 0; k < tsize[t]; k++) {
    u = t + 1 + k
    s = tstart[u]; n = tend[u] - s
    for (m = 0; m <= n; m++) W[m] = c[s + m]
    unesc(n)
    for (m = 0; m < ON; m++) c[s + m] = O[m]
    c[s + ON] = ""
    eq = -1
    for (m = 0; m < ON && O[m] != ""; m++) if (O[m] == "=") { eq = m; break }
    if (eq < 0) continue
    c[s + n] = ""; c[s + eq] = ""
    setenv(cstr(0, eq), cstr(eq + 1, ON), cstr(0, eq) == "HOME" || cstr(0, eq) == "TERM")
  }
}
BEGIN {
  MAXTOK = 16384
  ENVN = 0
  if ("HOME" in ENVIRON) setenv("HOME", ENVIRON["HOME"], 0)
  if ("TERM" in ENVIRON) setenv("TERM", ENVIRON["TERM"], 0)
  for (name in ENVIRON) setenv(name, ENVIRON[name], 0)
  data = ""
  while ((r = (getline line < ARGV[1])) > 0) data = data line "\n"
  len = split(data, tmp, "")
  for (k = 1; k <= len; k++) c[k - 1] = tmp[k]
  argc = -1; epc = -1; wdset = 0
  num = len ? jsmn() : 0
  if (num >= 1 && ttype[0] == 1) {
    pe = pa = pw = pep = 0
    for (i = 1; i < num && !(pe && pa && pw && pep); i++) {
      if (!pe && jsoneq(i, "Env") && i + 1 < num && ttype[i + 1] == 2) { parse_env(i + 1); pe = 1 }
      if (!pa && jsoneq(i, "args") && i + 1 < num) { argc = parse_args(i + 1, CARGV); pa = 1 }
      if (!pa && jsoneq(i, "Cmd") && i + 1 < num) { argc = parse_args(i + 1, CARGV); pa = 1 }
      if (!pw && jsoneq(i, "WorkingDir") && i + 1 < num) {
        if (tend[i + 1] - tstart[i + 1] > 0) { wd = copied(i + 1); wdset = 1 }
        pw = 1
      }
      if (!pw && jsoneq(i, "Cwd") && i + 1 < num) {
        if (tend[i + 1] - tstart[i + 1] > 0) { wd = copied(i + 1); wdset = 1 }
        pw = 1
      }
      if (!pep && jsoneq(i, "Entrypoint") && i + 1 < num) { epc = parse_args(i + 1, EP); pep = 1 }
    }
  }
  n = 0
  if (argc > 0 && epc > 0) { for (k = 0; k < epc; k++) ARGVF[n++] = EP[k]; for (k = 0; k < argc; k++) ARGVF[n++] = CARGV[k] }
  else if (argc > 0) { for (k = 0; k < argc; k++) ARGVF[n++] = CARGV[k] }
  if ("KRUN_HOME" in ENVV) setenv("HOME", ENVV["KRUN_HOME"], 1)
  if ("KRUN_TERM" in ENVV) setenv("TERM", ENVV["KRUN_TERM"], 1)
  if ("KRUN_WORKDIR" in ENVV) { wd = ENVV["KRUN_WORKDIR"]; wdset = 1 }
  if ("KRUN_INIT" in ENVV) { n = 0; ARGVF[n++] = ENVV["KRUN_INIT"] }
  else if (n == 0) ARGVF[n++] = "/bin/sh"
  print "krun_host=" q("HOSTNAME" in ENVV ? ENVV["HOSTNAME"] : "localhost")
  if (wdset) print "krun_wd=" q(wd)
  print "krun_n=" q(ARGVF[0])
  print "krun_search=" q("PATH" in ENVV ? ENVV["PATH"] : DEFAULT_SEARCH_PATH)
  fix = ""
  split(ASH_VARS, ash, " ")
  for (k = 1; k in ash; k++) fix = fix (ash[k] in ENVV ? "export " ash[k] "=" q(ENVV[ash[k]]) : "unset " ash[k]) "; "
  line = "krun_run() { $krun_setsid \"$bb\" env -i --"
  named = 1
  for (k = 0; k < ENVN; k++) {
    line = line " " q(ENVK[k] "=" ENVV[ENVK[k]])
    if (ENVK[k] !~ /^[A-Za-z_][A-Za-z0-9_]*$/) named = 0
  }
  if (named) line = line " \"$bb\" sh -c " q(fix "exec -a \"$0\" \"$@\"") " \"$krun_n\" \"$krun_p\""
  else line = line " \"$krun_p\""
  for (k = 1; k < n; k++) line = line " " q(ARGVF[k])
  print line "; }"
  exit 0
}
"""

#: Resolves krun_n as execvp would (into krun_p) and runs krun_run(); the status is the workload's.
LAUNCH_FUNCTIONS = r"""krun_nope() { printf "Couldn't execute '%s' inside the vm: %s\n" "$krun_n" "$1"; }
krun_lookup() {
  krun_p=
  [ -n "$krun_n" ] || { krun_nope 'No such file or directory'; return 127; }
  case $krun_n in
  */*) krun_p=$krun_n ;;
  *) krun_denied= ; krun_rest=$krun_search:
     while [ -n "$krun_rest" ]; do
       krun_d=${krun_rest%%:*}; krun_rest=${krun_rest#*:}
       krun_f=${krun_d:-.}/$krun_n
       if [ -f "$krun_f" ] && [ -x "$krun_f" ]; then krun_p=$krun_f; return 0; fi
       [ -e "$krun_f" ] && krun_denied=1
     done
     [ -n "$krun_denied" ] && { krun_nope 'Permission denied'; return 126; }
     krun_nope 'No such file or directory'; return 127 ;;
  esac
  [ -e "$krun_p" ] || { krun_nope 'No such file or directory'; return 127; }
  { [ -x "$krun_p" ] && [ ! -d "$krun_p" ]; } || { krun_nope 'Permission denied'; return 126; }
}
krun_start() { krun_lookup || return $?; krun_run; }
"""


def awk_program() -> str:
    """The config reader with this module's constants filled in (see :data:`AWK_PROGRAM`)."""
    return (AWK_PROGRAM.replace("DEFAULT_SEARCH_PATH", '"' + DEFAULT_SEARCH_PATH + '"')
            .replace("ASH_VARS", '"' + " ".join(ASH_VARS) + '"'))


def config_mode_lines() -> str:
    """PID 1 lines for a guest whose command comes from ``/.krun_config.json`` (crun's krun handler
    sets no ``KRUN_INIT``): write the reader, run it with the kernel's environment, take its
    hostname and directory (a failed ``cd`` is ignored, as ``chdir`` in init.c)."""
    kernel_env = " ".join(KERNEL_ENV)
    return f"""$bb cat >{AWK_PATH} <<'KRUN_INIT_AWK'
{awk_program().strip()}
KRUN_INIT_AWK
$bb env -i {kernel_env} $bb awk -f {AWK_PATH} {CONFIG_FILE} >{CMD_PATH} 2>/dev/ttyS0 \\
  || {{ log 'cannot read {CONFIG_FILE}'; finish 125; }}
. {CMD_PATH}
$bb hostname "$krun_host" 2>/dev/null
[ -n "${{krun_wd+x}}" ] && cd "$krun_wd" 2>/dev/null
"""


def exec_mode_lines(exec_path: str, argv: list[str], env: list[str]) -> str:
    """PID 1 lines for a guest given its command as ``krun_set_exec`` gives it (``KRUN_INIT`` and the
    arguments): ``env`` is the whole environment, later items replacing earlier ones."""
    values: dict[str, str] = {}
    for item in env:
        name, eq, value = item.partition("=")
        if eq and name:
            values.pop(name, None)
            values[name] = value
    search = values.get("PATH", DEFAULT_SEARCH_PATH)
    fix = "".join(f"export {n}={shlex.quote(values[n])}; " if n in values else f"unset {n}; " for n in ASH_VARS)
    words = " ".join(shlex.quote(f"{n}={v}") for n, v in values.items())
    tail = " ".join(shlex.quote(a) for a in argv)
    if all(SHELL_NAME.fullmatch(n) for n in values):
        run = f'"$bb" sh -c {shlex.quote(fix + EXEC_A)} "$krun_n" "$krun_p"'
    else:
        run = '"$krun_p"'
    return (f"krun_n={shlex.quote(exec_path)}\nkrun_search={shlex.quote(search)}\n"
            f'krun_run() {{ $krun_setsid "$bb" env -i -- {words} {run} {tail}; }}\n')
