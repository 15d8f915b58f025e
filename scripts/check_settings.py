"""Refuse a misspelled setting of scripts/run_bone.sh or scripts/merge_bone.sh before any work.

    python scripts/check_settings.py "$0"

Each script passes its own path; its settings are the variables it reads (every $NAME or ${NAME
in it), so the list cannot fall behind the script. An environment variable that is not one of
them but looks like one (the same name in other case; within one edit of a name of
4-5 letters, two of a longer one; or the same first word with the rest a prefix of the other's, as
BONE_RANK and BONE_R) is almost surely a typo that the script would silently ignore: one line names
it and the setting meant, and the exit status is 2. Anything else in the environment is no concern
of the scripts (PATH, HOME, MAX_JOBS...) and never matches: the rules are strict on purpose."""
import os
import re
import sys

# Never a typo of ours, whatever the rules say (common variables near a short setting's name).
COMMON = {"PATH", "HOME", "USER", "SHELL", "TERM", "LANG", "PWD", "OLDPWD", "BASH", "DATE", "MODE", "HOST",
          "HOSTNAME", "LOGNAME", "MAIL", "EDITOR", "PAGER", "DISPLAY", "TMPDIR", "TEMP", "TMP"}


def edits(a, b):
    """Optimal string alignment distance: insertions, deletions, substitutions, swaps of neighbours."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def meant(name, known):
    """The known setting `name` is a misspelling of, or None."""
    upper = name.upper()
    if upper in known:
        return upper
    close = [k for k in known if len(k) >= 4 and edits(upper, k) <= (1 if len(k) <= 5 else 2)]
    if close:
        return min(close, key=lambda k: edits(upper, k))
    first, _, rest = upper.partition("_")
    for k in sorted(known):
        k_first, _, k_rest = k.partition("_")
        if rest and k_rest and first == k_first and (rest.startswith(k_rest) or k_rest.startswith(rest)):
            return k
    return None


def main(script, environ=os.environ):
    with open(script, encoding="utf-8") as f:
        known = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", f.read()))
    script = os.path.basename(script)
    found = sorted((name, meant(name, known)) for name in environ
                   if name not in known and name.upper() not in COMMON)
    found = [(name, k) for name, k in found if k]
    if not found:
        return 0
    names, settings = " and ".join(n for n, _ in found), " and ".join(k for _, k in found)
    one = len(found) == 1
    print(f"{script}: {names} {'is not a setting' if one else 'are not settings'} of this script; did you mean "
          f"{settings}? (unset {names} if {'it is' if one else 'they are'} meant for something else)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
