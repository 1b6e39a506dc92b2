// Headless Chromium against the dashboard of a running `afo serve` started with a
// tiny cutline and a lazy model: the badge reads SAFE before the model loads, then
// changes once a request loads it and resident memory crosses the warn threshold.
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
  console.log(`dashboard test passed; screenshots in ${shots}`);
} finally {
  await context.close();
}
