#!/usr/bin/env python3
"""Training speed and the server's memory with and without a browser watching.

Runs `furnace run` on SmolLM2-135M (two LoRA runs) several times, alternating: alone, and
with headless Chromium showing the experiment's dashboard page (live plots fed by the event
stream) for the whole run. Reports, per case, the median training tokens/s (from the
store's per-step token counts and times) and the median peak RSS of the furnace process
(`/usr/bin/time -v`).

    python3 scripts/bench_dashboard.py [--furnace target/release/furnace] [--repeats 3]
"""
import argparse, json, os, re, shutil, sqlite3, statistics, subprocess, sys, tempfile, time, socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spec(name):
    return f"""[experiment]
name = "{name}"
num_chunks = 2

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "smollm2-135m-instruct"

[lora]
r = {{ list = [8, 16] }}
alpha = 16

[trainer]
learning_rate = 2e-4
batch_size = 2
max_seq_len = 128
max_steps = 12
"""


def one(furnace, watch, i):
    d = tempfile.mkdtemp(prefix="furnace-bench-ui-")
    try:
        for f, n in (("train.jsonl", 64), ("eval.jsonl", 8)):
            with open(os.path.join(ROOT, "data/extract", f)) as src, open(os.path.join(d, f), "w") as dst:
                dst.writelines(src.readlines()[:n])
        name = f"bench{i}"
        open(os.path.join(d, "spec.toml"), "w").write(spec(name))
        port = free_port()
        cmd = ["/usr/bin/time", "-v", furnace, "run", "spec.toml", "--port", str(port)]
        proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        browser = None
        if watch:
            # The page connects as soon as the server answers.
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
            browser = subprocess.Popen(
                [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", f"http://localhost:{port}/#/e/{name}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        err = proc.communicate()[1]
        if browser:
            browser.kill()
            browser.wait()
        if proc.returncode != 0:
            sys.exit(f"furnace run failed:\n{err}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
        db = sqlite3.connect(os.path.join(d, "runs/furnace.db"))
        rows = db.execute("SELECT step, value, time FROM metrics WHERE name = 'tokens' ORDER BY time").fetchall()
        tokens = sum(r[1] for r in rows[1:])
        secs = rows[-1][2] - rows[0][2]
        return tokens / secs, rss_kb / 1024
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--furnace", default=os.path.join(ROOT, "target/release/furnace"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    a.furnace = os.path.abspath(a.furnace)
    res = {False: [], True: []}
    for i in range(a.repeats):
        for watch in (False, True):
            tps, rss = one(a.furnace, watch, i * 2 + watch)
            res[watch].append((tps, rss))
            print(f"{'watched' if watch else 'alone  '}: {tps:7.1f} tokens/s, peak RSS {rss:7.1f} MiB", flush=True)
    for watch in (False, True):
        t = statistics.median(x[0] for x in res[watch])
        m = statistics.median(x[1] for x in res[watch])
        print(f"median {'watched' if watch else 'alone'}: {t:.1f} tokens/s, peak RSS {m:.1f} MiB")
    r = statistics.median(x[0] for x in res[True]) / statistics.median(x[0] for x in res[False])
    print(f"watched / alone: {r:.3f}x tokens/s")


if __name__ == "__main__":
    main()
