// The Node.js peer of spec/bench/pay_http.sh: the same WeChat Pay v3
// notifications verified and decrypted with Node's own crypto, over HTTP,
// on node's cluster module with BENCH_PAY_NODE_WORKERS (2) workers: headers
// present, timestamp within 300 s, SHA256withRSA (PKCS#1 v1.5) over
// "timestamp\nnonce\nbody\n" with the platform certificate, the nonce
// remembered (a Set per worker), the resource opened with AES-256-GCM (the
// APIv3 key, its nonce and associated_data, the tag checked), its JSON
// parsed; 204, or 401/400 with {"code":"FAIL"}. No order store: it does not
// transition anything. No npm packages.
'use strict';
const cluster = require('cluster');
const http = require('http');
const crypto = require('crypto');
const fs = require('fs');

const port = Number(process.env.BENCH_PAY_PORT);
const workers = Number(process.env.BENCH_PAY_NODE_WORKERS || 2);

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('exit', (w, code) => { if (code) console.error('worker exited', code); });
} else {
  const dir = process.env.BENCH_PAY_DIR;
  const apiv3 = Buffer.from(process.env.BENCH_PAY_APIV3 || '0123456789abcdef0123456789abcdef');
  const cert = new crypto.X509Certificate(fs.readFileSync(dir + '/plat.crt'));
  const serial = cert.serialNumber.toUpperCase();
  const pub = cert.publicKey;
  const seen = new Set();
  const fail = (res, status, message) => {
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ code: 'FAIL', message }));
  };
  http.createServer((req, res) => {
    if (req.url === '/health') { res.writeHead(200); res.end('ok'); return; }
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const ts = req.headers['wechatpay-timestamp'], nonce = req.headers['wechatpay-nonce'];
      const sig = req.headers['wechatpay-signature'], ser = req.headers['wechatpay-serial'];
      if (!ts || !nonce || !sig || !ser) return fail(res, 401, 'bad signature');
      if (!/^\d+$/.test(ts) || Math.abs(Date.now() / 1000 - Number(ts)) >= 300) return fail(res, 401, 'bad signature');
      if (ser.toUpperCase() !== serial) return fail(res, 401, 'bad signature');
      const msg = Buffer.concat([Buffer.from(ts + '\n' + nonce + '\n'), body, Buffer.from('\n')]);
      if (!crypto.verify('RSA-SHA256', msg, pub, Buffer.from(sig, 'base64'))) return fail(res, 401, 'bad signature');
      if (seen.has(nonce)) return fail(res, 400, 'replay');
      seen.add(nonce);
      let n, data;
      try {
        n = JSON.parse(body.toString('utf8'));
        const r = n.resource;
        const ct = Buffer.from(r.ciphertext, 'base64');
        const d = crypto.createDecipheriv('aes-256-gcm', apiv3, Buffer.from(r.nonce));
        d.setAAD(Buffer.from(r.associated_data || ''));
        d.setAuthTag(ct.subarray(ct.length - 16));
        data = JSON.parse(Buffer.concat([d.update(ct.subarray(0, ct.length - 16)), d.final()]).toString('utf8'));
      } catch (e) {
        return fail(res, 400, 'decrypt failed');
      }
      if (!data.out_trade_no) return fail(res, 400, 'json');
      res.writeHead(204);
      res.end();
    });
  }).listen(port, '127.0.0.1');
}
