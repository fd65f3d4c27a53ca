#!/usr/bin/env node
// Drive the demo page (/relay/v1/demo/) in headless Chromium with playwright-core
// (tests/test_demo_page.py runs it against a real stack).
//
//   node demo_page.mjs <base_url> --screenshot <png> [--chromium /usr/bin/chromium]
//                      [--rate R] [--max-tokens N] [--timeout-ms N]
//
// Starts a slow stream, clicks "Drop connection" twice mid-stream (each click after the
// previous resume delivered new events), waits for both panels to finish, saves a
// screenshot and prints one JSON line: {session, drops, writer, viewer, consoleErrors}, with
// each panel's {state, ids, text, reconnects, end, error}. Exit 0 when the page got that far
// (the Python test judges the result), 1 on a failure to drive it, 64 on bad usage.

import { chromium } from "playwright-core";

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

function usage(message) {
  process.stderr.write(`${message}\nusage: demo_page.mjs <base_url> --screenshot <png> ...\n`);
  process.exit(64);
}

const argv = process.argv.slice(2);
const options = {
  baseUrl: undefined,
  screenshot: undefined,
  chromium: "/usr/bin/chromium",
  rate: "25",
  maxTokens: "40",
  timeoutMs: 30000,
};
for (let i = 0; i < argv.length; i++) {
  const arg = argv[i];
  if (arg === "--screenshot") options.screenshot = argv[++i];
  else if (arg === "--chromium") options.chromium = argv[++i];
  else if (arg === "--rate") options.rate = argv[++i];
  else if (arg === "--max-tokens") options.maxTokens = argv[++i];
  else if (arg === "--timeout-ms") options.timeoutMs = Number(argv[++i]);
  else if (options.baseUrl === undefined && !arg.startsWith("--")) options.baseUrl = arg;
  else usage(`unexpected argument: ${arg}`);
}
if (!options.baseUrl || !options.screenshot) usage("missing <base_url> or --screenshot");

const browser = await chromium.launch({
  executablePath: options.chromium,
  headless: true,
  args: CHROMIUM_ARGS,
  timeout: options.timeoutMs,
});
let exitCode = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.setDefaultTimeout(options.timeoutMs);
  const consoleErrors = [];
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => consoleErrors.push(String(error)));

  const url = `${options.baseUrl}/relay/v1/demo/?rate=${options.rate}&max_tokens=${options.maxTokens}`;
  const response = await page.goto(url);
  if (response === null || response.status() !== 200) {
    throw new Error(`GET ${url}: ${response?.status()}`);
  }
  await page.waitForFunction(() => window.demo !== undefined);
  await page.click("#start");

  // Two drops mid-stream; each after the previous connection delivered events.
  await page.waitForFunction(() => window.demo.writer.ids.length >= 5);
  await page.click("#drop");
  await page.waitForFunction(() => {
    const w = window.demo.writer;
    return w.reconnects >= 1 && w.ids.length >= 12;
  });
  await page.click("#drop");
  await page.waitForFunction(() => window.demo.writer.reconnects >= 2);

  // Both panels finish (done or error: the test judges which).
  await page.waitForFunction(() =>
    ["writer", "viewer"].every((p) => ["done", "error"].includes(window.demo[p].state)),
  );
  await page.waitForSelector('#viewer[data-state="done"], #viewer[data-state="error"]');
  const result = await page.evaluate(() => JSON.parse(JSON.stringify(window.demo)));
  await page.screenshot({ path: options.screenshot, fullPage: true });
  process.stdout.write(`${JSON.stringify({ ...result, consoleErrors })}\n`);
} catch (error) {
  process.stderr.write(`demo_page: ${error?.stack ?? error}\n`);
  exitCode = 1;
} finally {
  await browser.close();
}
process.exitCode = exitCode;
