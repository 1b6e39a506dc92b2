// Headless Chromium against the dashboard of a running `afo serve` started with a
// tiny cutline and a lazy model: the badge reads SAFE before the model loads, then
// changes once a request loads it and resident memory crosses the warn threshold.
// Then, while a bounded burst of concurrent requests runs (loopback only), the
// charts must draw: the memory line against the cutline and warn lines, a predicted
// and a measured peak per run, a tokens/s and a TTFT point per finished run, the
// queue lines, the badge strip; a page opened afterwards starts with the server's
// history (/api/history), and one opened without the key still charts memory.
// Screenshot of the charts under load: dashboard-load.png.
//
// Usage: node dashboard.mjs BASE_URL API_KEY MODEL_ID SCREENSHOT_DIR
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
const { chromium } = require("playwright-core");

const [base, key, model, shots] = process.argv.slice(2);
const fail = (msg) => { console.error("dashboard test FAILED: " + msg); process.exit(1); };

const profile = mkdtempSync(join(tmpdir(), "afo-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1000, height: 640 },
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  await page.goto(base + "/#key=" + encodeURIComponent(key), { waitUntil: "load" });
  const badge = page.getByTestId("badge");
  const readBadge = async () => (await badge.textContent()).trim();
  await page.waitForFunction(() => document.getElementById("badge").textContent.trim() !== "…", null, { timeout: 10000 });
  const before = await readBadge();
  const health = await (await fetch(base + "/health")).json();
  console.log(`badge before the model loads: ${before} (${health.memory.resident_bytes} of ${health.memory.cutline_bytes} bytes, warn at ${health.memory.warn_bytes})`);
  if (before !== "SAFE") fail(`expected SAFE before loading, got ${before}`);
  if ((await badge.getAttribute("class")) !== "SAFE") fail("the badge's class does not follow its text");
  await page.screenshot({ path: join(shots, "dashboard-safe.png") });

  // A request loads the model: resident memory passes the warn threshold.
  const r = await fetch(base + "/v1/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer " + key },
    body: JSON.stringify({ model, messages: [{ role: "user", content: "Hi" }], max_tokens: 4 }),
  });
  console.log(`request that loads the model: HTTP ${r.status}`);
  await page.waitForFunction(() => document.getElementById("badge").textContent.trim() !== "SAFE", null, { timeout: 15000 })
    .catch(() => fail("the badge stayed SAFE after the model loaded"));
  const after = await readBadge();
  if (!["WARN", "OVER_CUTLINE"].includes(after)) fail(`unexpected badge ${after}`);
  const h2 = await (await fetch(base + "/health")).json();
  console.log(`badge after: ${after} (${h2.memory.resident_bytes} bytes resident)`);
  if (h2.memory.resident_bytes <= h2.memory.warn_bytes) fail("health says memory is under the warn threshold");
  if ((await badge.getAttribute("class")) !== after) fail("the badge's class does not follow its text");
  // The models table shows the model loaded; the runs table the run, when it ran.
  await page.waitForFunction((m) => document.getElementById("models").textContent.includes(m + "yes"), model, { timeout: 5000 })
    .catch(() => fail("the models table does not show the model loaded"));
  if (r.status === 200) {
    await page.waitForFunction(() => document.querySelectorAll("#runs tr").length > 0, null, { timeout: 5000 })
      .catch(() => fail("the run is not in the last-runs table"));
  }
  await page.screenshot({ path: join(shots, "dashboard.png") });

  // Under load: CLIENTS concurrent clients send REQUESTS chat completions in all.
  await page.setViewportSize({ width: 1280, height: 1000 });
  const CLIENTS = 12, REQUESTS = 24;
  const auth = { authorization: "Bearer " + key };
  const prompts = ["Write one sentence about the sea.", "Name three colors.", "What is a prime number?",
                   "Give me a tip for learning Rust.", "Describe a cat in a few words.", "Say something kind."];
  let next = 0;
  const statuses = [];
  const client = async () => {
    while (next < REQUESTS) {
      const i = next++;
      const res = await fetch(base + "/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json", ...auth },
        body: JSON.stringify({ model, messages: [{ role: "user", content: prompts[i % prompts.length] }],
                               max_tokens: 24, temperature: 0.7, seed: i }),
        signal: AbortSignal.timeout(120000),
      });
      await res.arrayBuffer();
      statuses.push(res.status);
    }
  };
  const t0 = Date.now();
  // While the burst runs, the queue chart must show the requests.
  const burst = Promise.all(Array.from({ length: CLIENTS }, client));
  const queued = page.waitForFunction(() => Number(document.getElementById("chart-queue").dataset.max) >= 1
    && document.querySelector("#chart-queue path.queue-waiting"), null, { timeout: 60000 });
  await burst;
  await queued.catch(() => fail("the queue chart did not draw during the burst"));
  console.log(`burst: ${REQUESTS} requests from ${CLIENTS} clients in ${Date.now() - t0} ms, statuses ${[...new Set(statuses)].join(",")}`);
  const ok = statuses.filter((x) => x === 200).length;
  if (ok < REQUESTS / 2) fail(`only ${ok} of ${REQUESTS} requests succeeded: ${statuses.join(",")}`);

  // The server's own history saw requests running.
  const hist = await (await fetch(base + "/api/history", { headers: auth })).json();
  const busiest = Math.max(...hist.samples.map((x) => x.running[0] + x.waiting[0]));
  console.log(`history: ${hist.samples.length} samples, at most ${busiest} requests running or waiting`);
  if (busiest < 1) fail("no history sample shows the burst");
  const badges = new Set(hist.samples.map((x) => x.badge));

  // Every finished run of the log is on the charts once the page has refreshed.
  const runs = (await (await fetch(base + "/api/runs", { headers: auth })).json()).runs;
  const finished = runs.filter((x) => x.status === "ok" && x.tokens_out > 0).length;
  const withPrediction = runs.filter((x) => x.status === "ok" && x.predicted_peak_bytes > 0).length;
  await page.waitForFunction((n) => document.querySelectorAll("#chart-tps circle.pt-tps").length >= n, finished, { timeout: 5000 })
    .catch(() => fail(`the tokens/s chart has fewer points than the ${finished} finished runs`));
  // The memory lines gain a point a second from the server's history: on a fast
  // machine the burst ends before five samples, so give the page the seconds it needs
  // (the checks below fail if it does not get there).
  await page.waitForFunction(() => ["line-resident", "line-reserved"].every((c) =>
    Number(document.querySelector(`#chart-memory path.${c}`)?.dataset.points) >= 5), null, { timeout: 20000 })
    .catch(() => {});
  const charts = await page.evaluate(() => {
    const count = (sel) => document.querySelectorAll(sel).length;
    const resident = document.querySelector("#chart-memory path.line-resident");
    const reserved = document.querySelector("#chart-memory path.line-reserved");
    return {
      resident: resident ? Number(resident.dataset.points) : 0,
      reserved: reserved ? Number(reserved.dataset.points) : 0,
      cutline: count("#chart-memory line.line-cutline"),
      warn: count("#chart-memory line.line-warn"),
      measured: count("#chart-memory circle.peak-measured"),
      predicted: count("#chart-memory circle.peak-predicted"),
      tps: count("#chart-tps circle.pt-tps"),
      ttft: count("#chart-ttft circle.pt-ttft"),
      queue: count("#chart-queue path.queue-running"),
      segments: [...document.querySelectorAll("#badge-strip rect.seg")].map((r) => r.dataset.badge),
      axisLabels: [...document.querySelectorAll("#chart-memory text")].map((t) => t.textContent),
    };
  });
  console.log(`charts: ${JSON.stringify({ ...charts, axisLabels: charts.axisLabels.length })}; ${finished} finished runs, ${withPrediction} with a predicted peak`);
  if (charts.resident < 5) fail(`the memory line has ${charts.resident} points`);
  if (charts.reserved < 5) fail(`the reserved line has ${charts.reserved} points`);
  if (charts.cutline !== 1 || charts.warn !== 1) fail("the cutline or the warn line is missing");
  if (!charts.axisLabels.includes("MiB")) fail("the memory chart has no unit");
  if (charts.measured < finished) fail(`${charts.measured} measured peaks for ${finished} finished runs`);
  if (charts.predicted < withPrediction || withPrediction < 1) fail(`${charts.predicted} predicted peaks for ${withPrediction} runs with one`);
  if (charts.tps < finished || charts.ttft < finished) fail(`tokens/s ${charts.tps} and TTFT ${charts.ttft} points for ${finished} finished runs`);
  if (charts.queue < 1) fail("no queue line");
  if (charts.segments.length < 2 || !charts.segments.includes("SAFE") || !charts.segments.includes("WARN")) {
    fail(`the badge strip should show SAFE then WARN (history saw ${[...badges].join(",")}): ${charts.segments.join(",")}`);
  }
  await page.screenshot({ path: join(shots, "dashboard-load.png") });

  // A page opened now starts with the server's history, not with one sample.
  const fresh = await context.newPage();
  await fresh.setViewportSize({ width: 1280, height: 1000 });
  await fresh.goto(base + "/#key=" + encodeURIComponent(key), { waitUntil: "load" });
  await fresh.waitForFunction(() => document.querySelector("#chart-memory path.line-resident"), null, { timeout: 10000 })
    .catch(() => fail("a fresh page drew no memory line"));
  const freshPoints = await fresh.evaluate(() => Number(document.querySelector("#chart-memory path.line-resident").dataset.points));
  console.log(`a fresh page starts with ${freshPoints} memory samples`);
  // The server has sampled at least five seconds by now (the first page waited for
  // them); a page without the server's history would start with one sample.
  if (freshPoints < 5) fail(`a fresh page starts with ${freshPoints} samples: no server-side history`);
  await fresh.close();

  // Without the key: /api/history is refused, the page charts the public /health itself.
  const unauth = await fetch(base + "/api/history");
  if (unauth.status !== 401) fail(`/api/history without the key answered ${unauth.status}`);
  const open = await context.newPage();
  await open.goto(base + "/", { waitUntil: "load" });
  await open.waitForFunction(() => Number(document.querySelector("#chart-memory path.line-resident")?.dataset.points) >= 2, null, { timeout: 10000 })
    .catch(() => fail("without the key the page does not chart memory from /health"));
  if (!(await open.textContent("#chart-queue")).includes("/#key=")) fail("without the key the queue chart does not say it needs one");
  await open.close();
  console.log(`dashboard test passed; screenshots in ${shots}`);
} finally {
  await context.close();
}
