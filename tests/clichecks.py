"""What every end-to-end test of the `segtutor` command checks of a finished command (imported by the test files)."""

def ok(r):
    "Exit status 0; otherwise the assertion shows both streams."
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r

def fails(r, *needles):
    "Non-zero exit, one clear last line on stderr mentioning every needle, no traceback; returns that line."
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert 'Traceback' not in err, err
    last = err.splitlines()[-1]
    for n in needles: assert str(n) in last, f"{n!r} not in {last!r}"
    return last
