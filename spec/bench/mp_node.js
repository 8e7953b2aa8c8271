// The Node.js peer of spec/bench/mp.sh: the npm `wechat` middleware in safe
// mode (token, appid, EncodingAESKey) answering a text message with
// "echo: <Content>", on node's own http server, in MP_NODE_WORKERS (2)
// processes with the cluster module.
//
//   NODE_PATH=build/bench/node/node_modules MP_PORT=8081 MP_TOKEN=... \
//   MP_APPID=... MP_AES_KEY=... node spec/bench/mp_node.js
//
// Routes: POST/GET /wx (the middleware), GET /health ("ok").
// The middleware needs req.query: it is parsed here, as express would.
// `make deps-bench-mp` installs the pinned `wechat` into build/bench/node.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');
const querystring = require('node:querystring');

function setting(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`mp_node: ${name} is not set`);
    process.exit(2);
  }
  return v;
}

const port = Number(setting('MP_PORT'));
const workers = Number(process.env.MP_NODE_WORKERS || 2);
const config = { token: setting('MP_TOKEN'), appid: setting('MP_APPID'), encodingAESKey: setting('MP_AES_KEY') };

if (cluster.isPrimary) {
  let stopping = false;
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) return;
    console.error(`mp_node: worker ${worker.process.pid} died (${signal || code}); stopping`);
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM');
    process.exit(1);
  });
  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  let wechat;
  try {
    wechat = require('wechat');
  } catch (e) {
    console.error('mp_node: cannot load the npm package wechat (run make deps-bench-mp): ' + e.message);
    process.exit(2);
  }
  const middleware = wechat(config, wechat.text((message, req, res) => {
    res.reply('echo: ' + message.Content);
  }));
  const server = http.createServer((req, res) => {
    const q = req.url.indexOf('?');
    const path = q < 0 ? req.url : req.url.slice(0, q);
    if (path === '/health') {
      res.end('ok\n');
      return;
    }
    if (path !== '/wx') {
      res.statusCode = 404;
      res.end('not found\n');
      return;
    }
    req.query = querystring.parse(q < 0 ? '' : req.url.slice(q + 1));
    middleware(req, res, (err) => {
      // The middleware calls next() for what it does not handle, next(err)
      // for a body it cannot parse.
      res.statusCode = err ? 400 : 404;
      res.end(err ? 'bad request\n' : 'not handled\n');
    });
  });
  server.listen(port, '127.0.0.1');
}
