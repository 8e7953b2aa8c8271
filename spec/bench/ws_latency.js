// Publish-to-frame latency of wxd topics (spec/bench/ws_latency.lua runs it):
//   node ws_latency.js SUB_URL PUB_URL SUBSCRIBERS PUBLISHES
// opens SUBSCRIBERS WebSocket connections to SUB_URL (a /sub?topic= route),
// then PUBLISHES times requests PUB_URL (a /publish-now route, which
// publishes the server's wall-clock time) and waits until every subscriber
// has the frame. Each subscriber's latency is its arrival time minus the
// time in the frame. Prints one JSON line: { n, p50, p99, max } in ms.
'use strict';
const WebSocket = require('ws');
const http = require('http');
const [subUrl, pubUrl, nSubs, nPubs] = process.argv.slice(2);
const N = Number(nSubs), P = Number(nPubs);
const wallMs = () => performance.timeOrigin + performance.now();

const lat = [];
let ready = 0, pending = 0, round = 0;
// Warm-up: cross-node subscriptions start asynchronously, so publish until
// every subscriber has had a frame, then measure.
let phase = 'warm', warmed = 0, warmTimer = null;
const agent = new http.Agent({ keepAlive: true, maxSockets: 4 });

function publish() {
  if (round++ === P) return done();
  pending = N;
  http.get(pubUrl, { agent }, (res) => res.resume()).on('error', (e) => { console.error(e); process.exit(1); });
}

function done() {
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(lat.length * p))];
  console.log(JSON.stringify({ n: lat.length, p50: +q(0.5).toFixed(3), p99: +q(0.99).toFixed(3), max: +lat[lat.length - 1].toFixed(3) }));
  process.exit(0);
}

for (let i = 0; i < N; i++) {
  const ws = new WebSocket(subUrl, { perMessageDeflate: false });
  ws.on('error', (e) => { console.error('subscriber', i, e.message); process.exit(1); });
  ws.on('message', (data) => {
    const s = data.toString();
    if (s.startsWith('subscribed')) {
      if (++ready === N) {
        warmTimer = setInterval(() => http.get(pubUrl, { agent }, (res) => res.resume()), 100);
      }
      return;
    }
    if (phase === 'warm') {
      if (!ws.warm) { ws.warm = true; warmed++; }
      if (warmed === N) {
        phase = 'gap';
        clearInterval(warmTimer);
        setTimeout(() => { phase = 'measure'; publish(); }, 500);
      }
      return;
    }
    if (phase !== 'measure') return;
    lat.push(wallMs() - Number(s) * 1000);
    if (--pending === 0) publish();
  });
}
setTimeout(() => { console.error('timeout: ready', ready, 'round', round, 'pending', pending); process.exit(1); }, 120000).unref();
