-- WeChat Pay v3 notification micro-benchmark: how many notifications one
-- core checks and opens per second with wxd.pay (client:notification: the
-- headers, the ±5 min window, SHA256withRSA over the raw body, the nonce
-- remembered in the store, AES-256-GCM of the resource, JSON), next to
-- Node's crypto doing the same steps (verify, a Set for nonces, GCM, JSON)
-- over the same notifications. Run with `build/wxd script
-- spec/bench/pay.lua` (or `make bench-pay`, which `make bench` calls).
--
-- In-process on one core each, without HTTP: the end-to-end benchmark on 2
-- workers (with the state machine's transitions) is spec/bench/pay_http.sh. Each notification is distinct (WeChat Pay signs each
-- delivery with its own nonce), made once before the rounds; each wxd
-- round uses another merchant id, so that its nonces are new to the store.
--
-- Environment: BENCH_PAY_COUNT (notifications, default 3000),
-- BENCH_ROUNDS (default 3).
local crypto = require "wxd.crypto"
local pay = require "wxd.pay"
local wxd = require "wxd"

local COUNT = tonumber(os.getenv("BENCH_PAY_COUNT") or "3000")
local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS") or "3")
local APIV3 = "0123456789abcdef0123456789abcdef"

local function sh(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"__rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return (out:gsub("__rc=%d+%s*$", "")), rc
end

local dir = (sh("mktemp -d /tmp/wxd-bench-pay.XXXXXX")):gsub("%s+$", "")
local _, rc = sh(string.format("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout plat.key -out plat.crt "
  .. "-days 2 -subj /CN=bench -set_serial 0x5157F09EFDC096DE15EBE81A47057A7232F1B8E1 && "
  .. "openssl genrsa -out mch.key 2048", dir))
assert(rc == 0, "openssl could not make the keys")
local function read(name)
  local f = assert(io.open(dir .. "/" .. name, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
local plat_key = assert(crypto.load_private_key(read("plat.key")))
local serial = assert(crypto.load_certificate(read("plat.crt"))):serial()

-- The notifications, as WeChat Pay sends them (a payment of a few hundred
-- bytes of resource), also written for Node: one JSON object per line.
io.write(string.format("bench-pay: signing %d notifications ... ", COUNT))
io.flush()
local notes = {}
local lines = {}
local ts = tostring(math.floor(wxd.now()))
for i = 1, COUNT do
  local resource = string.format('{"mchid":"1900000001","appid":"wxd678efh567hg6787","out_trade_no":"BENCH%08d",'
    .. '"transaction_id":"4200000%09d","trade_type":"JSAPI","trade_state":"SUCCESS","trade_state_desc":"ok",'
    .. '"bank_type":"CMC","success_time":"2026-12-03T10:00:00+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},'
    .. '"amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"}}', i, i)
  local gnonce = crypto.nonce(12)
  local body = string.format('{"id":"EV-%d","create_time":"2026-12-03T10:00:00+08:00","resource_type":"encrypt-resource",'
    .. '"event_type":"TRANSACTION.SUCCESS","summary":"ok","resource":{"original_type":"transaction",'
    .. '"algorithm":"AEAD_AES_256_GCM","ciphertext":"%s","associated_data":"transaction","nonce":"%s"}}', i,
    crypto.base64_encode(crypto.aes_gcm_encrypt(APIV3, gnonce, resource, "transaction")), gnonce)
  local nonce = crypto.nonce(32)
  local sig = crypto.base64_encode(plat_key:sign(ts .. "\n" .. nonce .. "\n" .. body .. "\n"))
  notes[i] = { body = body, headers = { ["wechatpay-timestamp"] = ts, ["wechatpay-nonce"] = nonce,
    ["wechatpay-signature"] = sig, ["wechatpay-serial"] = serial } }
  lines[i] = require("wxd.json").encode({ body = body, ts = ts, nonce = nonce, sig = sig, serial = serial })
end
local f = assert(io.open(dir .. "/notes.jsonl", "wb"))
f:write(table.concat(lines, "\n"), "\n")
f:close()
print("done")

local function wxd_round(r)
  local c = pay.client({ mchid = tostring(1900000000 + r), serial = "3775B6A45ACD588826D15E583A95F5DD00000001",
    private_key = read("mch.key"), apiv3_key = APIV3, platform_cert_pems = { read("plat.crt") },
    api_base = "http://127.0.0.1:1", backup_base = false, background = false })
  local t0 = wxd.monotonic_ms()
  for i = 1, COUNT do
    local n = notes[i]
    local ok, err = c:notification(n.headers, n.body)
    if not ok then error("bench-pay: notification " .. i .. " refused: " .. tostring(err)) end
  end
  return COUNT / ((wxd.monotonic_ms() - t0) / 1000)
end

local NODE = [[
const c = require('crypto'), fs = require('fs');
const dir = process.argv[2], apiv3 = Buffer.from(process.argv[3]);
const pub = c.createPublicKey(fs.readFileSync(dir + '/plat.crt'));
const serial = process.argv[4];
const notes = fs.readFileSync(dir + '/notes.jsonl', 'utf8').trim().split('\n').map(JSON.parse);
const seen = new Set();
const t0 = process.hrtime.bigint();
for (const n of notes) {
  if (n.serial !== serial) throw new Error('serial');
  if (Math.abs(Date.now() / 1000 - Number(n.ts)) >= 300) throw new Error('stale');
  const ok = c.verify('RSA-SHA256', Buffer.from(n.ts + '\n' + n.nonce + '\n' + n.body + '\n'), pub,
                      Buffer.from(n.sig, 'base64'));
  if (!ok) throw new Error('signature');
  if (seen.has(n.nonce)) throw new Error('replay');
  seen.add(n.nonce);
  const r = JSON.parse(n.body).resource;
  const ct = Buffer.from(r.ciphertext, 'base64');
  const d = c.createDecipheriv('aes-256-gcm', apiv3, Buffer.from(r.nonce));
  d.setAAD(Buffer.from(r.associated_data));
  d.setAuthTag(ct.subarray(ct.length - 16));
  const data = JSON.parse(Buffer.concat([d.update(ct.subarray(0, ct.length - 16)), d.final()]).toString('utf8'));
  if (!data.out_trade_no) throw new Error('resource');
}
const s = Number(process.hrtime.bigint() - t0) / 1e9;
console.log((notes.length / s).toFixed(0));
]]

do
  local js = assert(io.open(dir .. "/peer.js", "wb"))
  js:write(NODE)
  js:close()
end

local function node_round()
  local out, code = sh(string.format("node %s/peer.js %s %s %s", dir, dir, APIV3, serial))
  if code ~= 0 then return nil, out end
  return tonumber(out:match("(%d+)%s*$"))
end

local have_node = select(2, sh("command -v node")) == 0
local function median(t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  return s[math.floor((#s + 1) / 2)]
end

print(string.format("bench-pay: %d rounds of %d distinct notifications, one core each (in-process, no HTTP)", ROUNDS, COUNT))
local w, n = {}, {}
for r = 1, ROUNDS do
  w[r] = wxd_round(r)
  local nr, err = nil, "node is not installed"
  if have_node then nr, err = node_round() end
  n[r] = nr
  print(string.format("  round %d: wxd %8.0f/s   node %s", r, w[r], nr and string.format("%8.0f/s", nr)
    or ("n/a (" .. tostring(err):sub(1, 200) .. ")")))
end
local wm = median(w)
local nm = #n == ROUNDS and median(n) or nil
print(string.format("median: wxd %.0f notifications/s, node %s, wxd/node %s", wm, nm and string.format("%.0f/s", nm) or "n/a",
  nm and string.format("%.2f", wm / nm) or "n/a"))
os.execute("rm -rf " .. dir)
