-- Helper of spec/bench/pay_http.sh, run with `wxd script`:
--   keys DIR                      the fake WeChat Pay's platform key and certificate, the merchant key (openssl CLI)
--   gen DIR FILE COUNT RUN FIRST  COUNT distinct v3 payment notifications, one per line:
--                                 "timestamp\tnonce\tsignature\tserial\tbody", for orders
--                                 B<RUN>x<FIRST>..B<RUN>x<FIRST+COUNT-1> (amount 100 CNY), ids EV-<RUN>-<seq>
-- Each notification has its own nonce and RSA signature, as WeChat Pay signs
-- each delivery: the signatures are made here, before the measurement.
local crypto = require "wxd.crypto"
local wxd = require "wxd"

local APIV3 = os.getenv("BENCH_PAY_APIV3") or "0123456789abcdef0123456789abcdef"
local MCHID, APPID = "1900000001", "wxbenchappid0001"
local cmd = arg[1]

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

if cmd == "keys" then
  local dir = assert(arg[2], "keys DIR")
  local ok = os.execute(string.format("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -keyout plat.key "
    .. "-out plat.crt -days 2 -subj /CN=bench -set_serial 0x5157F09EFDC096DE15EBE81A47057A7232F1B8E1 "
    .. ">/dev/null 2>&1 && openssl genrsa -out mch.key 2048 >/dev/null 2>&1", dir))
  assert(ok == 0 or ok == true, "openssl could not make the keys")
  return
end

assert(cmd == "gen", "usage: pay_tool.lua keys DIR | gen DIR FILE COUNT RUN FIRST")
local dir, file = arg[2], arg[3]
local count, run, first = tonumber(arg[4]), arg[5], tonumber(arg[6])
local key = assert(crypto.load_private_key(read(dir .. "/plat.key")))
local serial = assert(crypto.load_certificate(read(dir .. "/plat.crt"))):serial()
local out = assert(io.open(file, "wb"))
local ts = tostring(math.floor(wxd.now()))
for seq = first, first + count - 1 do
  local resource = string.format('{"mchid":"%s","appid":"%s","out_trade_no":"B%sx%d","transaction_id":"42%s%09d",'
    .. '"trade_type":"JSAPI","trade_state":"SUCCESS","trade_state_desc":"ok","bank_type":"CMC",'
    .. '"success_time":"2026-12-03T10:00:00+08:00","payer":{"openid":"oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},'
    .. '"amount":{"total":100,"payer_total":100,"currency":"CNY","payer_currency":"CNY"}}',
    MCHID, APPID, run, seq, run, seq)
  local gnonce = crypto.nonce(12)
  local body = string.format('{"id":"EV-%s-%d","create_time":"2026-12-03T10:00:00+08:00",'
    .. '"resource_type":"encrypt-resource","event_type":"TRANSACTION.SUCCESS","summary":"ok","resource":'
    .. '{"original_type":"transaction","algorithm":"AEAD_AES_256_GCM","ciphertext":"%s",'
    .. '"associated_data":"transaction","nonce":"%s"}}', run, seq,
    crypto.base64_encode(crypto.aes_gcm_encrypt(APIV3, gnonce, resource, "transaction")), gnonce)
  local nonce = crypto.nonce(32)
  local sig = crypto.base64_encode(key:sign(ts .. "\n" .. nonce .. "\n" .. body .. "\n"))
  out:write(ts, "\t", nonce, "\t", sig, "\t", serial, "\t", body, "\n")
end
out:close()
