--- wxd.testing: test your app without a server, and your WeChat handlers
-- without WeChat.
--
-- `testing.app(dir, opts)` loads an app as the server does (its config.lua,
-- or a config given, with env() values given) and sends it requests built
-- here: the responses come back with status, headers and decoded body.
--
-- A fake sender signs (and, in compatible and safe mode, encrypts) messages
-- exactly as WeChat does, and opens the replies: it checks their signature
-- and decrypts them. Use it with `app:handle` in busted specs run by
-- `wxd script spec/runner.lua`, or over real HTTP with `wx:build`.
--
-- @module wxd.testing
-- @usage
-- local testing = require "wxd.testing"
-- local app = dofile("app.lua")
-- local wx = testing.wechat({ token = "t0ken", appid = "wx0123456789abcdef",
--                             aes_key = string.rep("a", 43), mode = "safe" })
-- local reply = wx:send(app, { MsgType = "text", Content = "hi" })
-- assert.equal("echo: hi", reply.Content)
-- @usage
-- local client = testing.app(".", { env = { WXD_MP_TOKEN = "t0ken" } })
-- local res = client:post("/orders", { json = { sku = "A1" } })
-- assert.equal(201, res.status)
-- assert.equal("A1", res.json.sku)

local json = require "wxd.json"
local mp = require "wxd.mp"
local xml = require "wxd.xml"
local crypto = require "wxd.crypto"
local app_mod = require "wxd.app"
local core = require "wxd.core"
local config = require "wxd.config"
local wxd = require "wxd"

local type, error, pairs, ipairs, tostring, setmetatable = type, error, pairs, ipairs, tostring, setmetatable
local getmetatable = getmetatable
local floor, format, concat = math.floor, string.format, table.concat
local url_encode = app_mod.url_encode

local _M = { _VERSION = "0.1.0" }

local MODES = { plaintext = true, compatible = true, safe = true }

local Sender = {}
Sender.__index = Sender

-- What testing.app returns: an app loaded with its config, and requests.
local Client = {}
Client.__index = Client

local counter = 0

--- A fake WeChat sender.
-- @tparam table opts `token` (required), `appid` (or `corp_id` for
--   WeCom), `aes_key` (needed for compatible and safe mode), `mode`
--   ("plaintext", "compatible" or "safe"; default safe with a key, else
--   plaintext), `kind` ("mp", "miniprogram", "wecom"), `format` ("xml" or
--   "json"), `path` (default "/wx"), `account` (ToUserName, default
--   "gh_test_account"), `openid` (FromUserName), `agent_id` (WeCom)
-- @treturn table the sender
function _M.wechat(opts)
  if type(opts) ~= "table" or type(opts.token) ~= "string" then
    error("wxd.testing.wechat: opts.token is required", 2)
  end
  local kind = opts.kind or "mp"
  local mode = opts.mode or ((opts.aes_key and "safe") or "plaintext")
  if kind == "wecom" then mode = "safe" end
  if not MODES[mode] then error("wxd.testing.wechat: unknown mode " .. tostring(mode), 2) end
  local key
  if opts.aes_key then
    key = mp.aes_key(opts.aes_key)
    if not key then error("wxd.testing.wechat: opts.aes_key is not a 43-character EncodingAESKey", 2) end
  elseif mode ~= "plaintext" then
    error("wxd.testing.wechat: mode " .. mode .. " needs opts.aes_key", 2)
  end
  local receive_id = opts.receive_id or (kind == "wecom" and opts.corp_id or opts.appid)
  if key and type(receive_id) ~= "string" then
    error("wxd.testing.wechat: opts." .. (kind == "wecom" and "corp_id" or "appid") .. " is required with a key", 2)
  end
  return setmetatable({
    token = opts.token, key = key, receive_id = receive_id, mode = mode, kind = kind,
    format = opts.format or "xml", path = opts.path or "/wx",
    account = opts.account or "gh_test_account", openid = opts.openid or "o_test_user_000000000000000",
    agent_id = opts.agent_id or "1000002",
  }, Sender)
end

--- A message with the fields WeChat always sends filled in: ToUserName,
-- FromUserName, CreateTime (now) and, for non-events, a fresh MsgId.
-- @tparam table fields e.g. `{ MsgType = "text", Content = "hi" }`
-- @treturn table the message
function Sender:message(fields)
  local m = {}
  for k, v in pairs(fields) do m[k] = v end
  m.ToUserName = m.ToUserName or self.account
  m.FromUserName = m.FromUserName or self.openid
  m.CreateTime = m.CreateTime or floor(core.now())
  if m.MsgType ~= "event" and m.MsgId == nil then
    counter = counter + 1
    m.MsgId = format("%d%07d", floor(core.now()), counter % 10000000)
  end
  return m
end

local HEAD = { "ToUserName", "FromUserName", "CreateTime", "MsgType" }

local function serialize(self, msg)
  if type(msg) == "string" then return msg end
  if self.format == "json" then return json.encode(msg) end
  local t = {}
  for k, v in pairs(msg) do t[k] = v end
  t._order = t._order or HEAD
  return xml.encode(t)
end

local function query_string(params)
  local parts = {}
  for _, kv in ipairs(params) do
    parts[#parts + 1] = kv[1] .. "=" .. url_encode(kv[2])
  end
  return concat(parts, "&")
end

--- Builds what WeChat would send for a message.
-- @tparam table|string msg a message table (completed by `message`), or a
--   document sent as is
-- @tparam[opt] table opts `timestamp` (default now), `nonce`, `signature`
--   or `msg_signature` (to send a forged one), `encrypt` (a ready Encrypt
--   value, e.g. tampered), `plain` (the plaintext to encrypt instead of the
--   message: a wrong appid inside, say), `receive_id` (encrypt for another
--   id), `body` (replace the whole body), `encrypt_type`
-- @treturn table `{ path, query_string, url, body, msg }`
function Sender:build(msg, opts)
  opts = opts or {}
  if type(msg) == "table" then msg = self:message(msg) end
  local doc = serialize(self, msg)
  local ts = tostring(opts.timestamp or floor(core.now()))
  local r = crypto.random_bytes(3)
  local nonce = opts.nonce or tostring(100000000 + (r:byte(1) * 256 + r:byte(2)) * 256 + r:byte(3))
  local params = {}
  local body
  if self.mode == "plaintext" then
    params[#params + 1] = { "signature", opts.signature or mp.signature(self.token, ts, nonce) }
    params[#params + 1] = { "timestamp", ts }
    params[#params + 1] = { "nonce", nonce }
    params[#params + 1] = { "openid", type(msg) == "table" and tostring(msg.FromUserName) or self.openid }
    if opts.encrypt_type then params[#params + 1] = { "encrypt_type", opts.encrypt_type } end
    body = doc
  else
    local enc = opts.encrypt or mp.encrypt(self.key, opts.plain or doc, opts.receive_id or self.receive_id)
    local msig = opts.msg_signature or mp.signature(self.token, ts, nonce, enc)
    if self.kind ~= "wecom" then
      params[#params + 1] = { "signature", opts.signature or mp.signature(self.token, ts, nonce) }
    end
    params[#params + 1] = { "timestamp", ts }
    params[#params + 1] = { "nonce", nonce }
    if self.kind ~= "wecom" then
      params[#params + 1] = { "openid", type(msg) == "table" and tostring(msg.FromUserName) or self.openid }
      params[#params + 1] = { "encrypt_type", opts.encrypt_type or "aes" }
    end
    params[#params + 1] = { "msg_signature", msig }
    local outer
    if self.mode == "compatible" then
      -- The plaintext fields and Encrypt side by side.
      local fields = msg
      if type(msg) == "string" then
        fields = self.format == "json" and json.decode(msg) or xml.decode(msg) or {}
      end
      outer = {}
      for k, v in pairs(fields) do outer[k] = v end
      outer.Encrypt = enc
    elseif self.kind == "wecom" then
      outer = { ToUserName = self.receive_id, AgentID = self.agent_id, Encrypt = enc,
                _order = { "ToUserName", "AgentID", "Encrypt" } }
    else
      outer = { ToUserName = type(msg) == "table" and msg.ToUserName or self.account, Encrypt = enc,
                _order = { "ToUserName", "Encrypt" } }
    end
    if self.format == "json" then
      outer._order = nil
      body = json.encode(outer)
    else
      outer._order = outer._order or HEAD
      body = xml.encode(outer)
    end
  end
  if opts.body then body = opts.body end
  local qs = query_string(params)
  return { path = self.path, query_string = qs, url = self.path .. "?" .. qs, body = body, msg = msg }
end

local function raw_request(method, path, qs, body)
  counter = counter + 1
  return { method = method, path = path, query_string = qs, version = "1.1",
    headers = { ["content-type"] = "text/xml" }, body = body or "",
    remote_addr = "127.0.0.1", remote_port = 40000, id = format("test%014d", counter) }
end

--- The raw request table `app:handle` takes, for a message.
-- @treturn table
-- @treturn table what `build` returned
function Sender:request(msg, opts)
  local b = self:build(msg, opts)
  return raw_request("POST", b.path, b.query_string, b.body), b
end

--- The URL verification WeChat does when the URL is configured (GET).
-- @tparam[opt] string echostr default a random number
-- @tparam[opt] table opts `timestamp`, `nonce`, `signature`
-- @treturn table the raw request for app:handle
-- @treturn string the echostr the app must answer
-- @treturn string the query string (for a real HTTP request)
function Sender:verification(echostr, opts)
  opts = opts or {}
  echostr = echostr or tostring(1000000000 + crypto.random_bytes(1):byte() * 1000)
  local ts = tostring(opts.timestamp or floor(core.now()))
  local nonce = opts.nonce or "1406557218"
  local params
  if self.kind == "wecom" then
    local enc = mp.encrypt(self.key, echostr, self.receive_id)
    params = { { "msg_signature", opts.signature or mp.signature(self.token, ts, nonce, enc) },
      { "timestamp", ts }, { "nonce", nonce }, { "echostr", enc } }
  else
    params = { { "signature", opts.signature or mp.signature(self.token, ts, nonce) },
      { "timestamp", ts }, { "nonce", nonce }, { "echostr", echostr } }
  end
  local qs = query_string(params)
  return raw_request("GET", self.path, qs), echostr, qs
end

--- Opens a reply: "success" as is; otherwise the document is parsed and,
-- when encrypted, its MsgSignature is checked and it is decrypted.
-- @tparam string body the response body
-- @treturn[1] string|table "success", or the reply message as a table
-- @treturn[1] string the reply document (decrypted)
-- @treturn[2] nil
-- @treturn[2] string "bad reply signature", "decrypt failed", "invalid xml", ...
function Sender:open_reply(body)
  if body == "success" or body == "" then return "success", body end
  if type(body) ~= "string" then return nil, "no body" end
  local function parse(s)
    if s:match("^%s*{") then
      local t = json.decode(s)
      if type(t) ~= "table" then return nil, "invalid json" end
      return t
    end
    local t, err = xml.decode(s, { arrays = { item = true } })
    return t, err
  end
  local t, err = parse(body)
  if not t then return nil, err end
  if t.Encrypt == nil then return t, body end
  if not self.key then return nil, "encrypted reply but no aes_key" end
  local sig = mp.signature(self.token, tostring(t.TimeStamp), tostring(t.Nonce), t.Encrypt)
  if not crypto.equals(sig, tostring(t.MsgSignature)) then return nil, "bad reply signature" end
  local plain, derr = mp.decrypt(self.key, t.Encrypt, self.receive_id)
  if not plain then return nil, derr end
  local inner, ierr = parse(plain)
  if not inner then return nil, ierr end
  return inner, plain
end

--- Sends a message through `app:handle` and opens the reply.
-- @tparam table app the app, or a client of `testing.app` (its app, loaded
--   with its config and env)
-- @tparam table|string msg the message
-- @tparam[opt] table opts as for `build`
-- @treturn string|table|nil "success" or the reply table; nil when the
--   status is not 200 or the reply does not open
-- @treturn number the status
-- @treturn string the body as sent
-- @treturn ?string why the reply did not open
function Sender:send(app, msg, opts)
  if getmetatable(app) == Client then app = app.app end
  local status, _, body = app:handle((self:request(msg, opts)))
  if status ~= 200 then return nil, status, body end
  local reply, err = self:open_reply(body)
  if reply == nil then return nil, status, body, err end
  return reply, status, body
end

------------------------------------------------------------------------
-- Apps and HTTP requests
------------------------------------------------------------------------

--- Loads the app in `dir` as the server does: its config.lua is read and
-- validated (or `opts.config` instead), `wxd.config` is set, and app.lua
-- runs. Modules of the app (`require "handlers.x"`) are found in `dir`.
-- Raises when the config or the app does not load (a spec should fail).
-- @tparam[opt] string dir the app directory (default ".")
-- @tparam[opt] table opts `config` (a config table, validated, used instead
--   of config.lua), `env` (a table of the values `env("NAME")` reads in the
--   config, before the process environment)
-- @treturn table a client: `client:request(method, path, ropts)`,
--   `client:get(path, ropts)`, `:post`, `:put`, `:patch`, `:delete`;
--   `client.app` is the app, `client.config` the config
function _M.app(dir, opts)
  dir = dir or "."
  opts = opts or {}
  if type(dir) ~= "string" then error("wxd.testing.app: dir must be a string", 2) end
  local vars = opts.env
  local getenv = os.getenv
  if vars then
    getenv = function(name)
      local v = vars[name]
      if v ~= nil then return tostring(v) end
      return os.getenv(name)
    end
  end
  local cfg, err
  if opts.config then
    cfg, err = config.validate(opts.config, { getenv = getenv })
  else
    local path = dir .. "/config.lua"
    local f = io.open(path, "rb")
    if f then f:close() else path = nil end
    cfg, err = config.load(path, { getenv = getenv })
    if not cfg and path and tostring(err):sub(1, #path) ~= path then err = path .. ": " .. tostring(err) end
  end
  if not cfg then error("wxd.testing.app: " .. tostring(err), 2) end
  wxd.config = cfg
  wxd.app_dir = dir
  wxd.generation = 1
  local prefix = dir .. "/?.lua;" .. dir .. "/?/init.lua;"
  if package.path:sub(1, #prefix) ~= prefix then package.path = prefix .. package.path end
  local chunk, lerr = loadfile(dir .. "/app.lua")
  if not chunk then error("wxd.testing.app: " .. lerr, 2) end
  local app = chunk()
  if type(app) ~= "table" or type(app.handle) ~= "function" then
    error("wxd.testing.app: " .. dir .. "/app.lua must return an app", 2)
  end
  return setmetatable({ app = app, config = cfg }, Client)
end

local function encode_query(q)
  if type(q) == "string" then return q end
  local keys = {}
  for k in pairs(q) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = q[k]
    if type(v) == "table" then
      for _, x in ipairs(v) do parts[#parts + 1] = url_encode(k) .. "=" .. url_encode(tostring(x)) end
    else
      parts[#parts + 1] = url_encode(k) .. "=" .. url_encode(tostring(v))
    end
  end
  return concat(parts, "&")
end

--- Sends a request through the app (as the server would, without a
-- socket) and returns its response.
-- @tparam string method "GET", "POST", ...
-- @tparam string path the path, with a query string or not
-- @tparam[opt] table ropts `query` (a string, or a table: a list value
--   gives repeated keys), `headers`, `body` (a string), `json` (a value sent
--   as a JSON body), `form` (a table sent url-encoded), `remote_addr`
-- @treturn table `{ status, headers, body, json }`: header names in lower
--   case; `json` is the decoded body when the response is JSON
function Client:request(method, path, ropts)
  ropts = ropts or {}
  local qs = ""
  local q = path:find("?", 1, true)
  if q then path, qs = path:sub(1, q - 1), path:sub(q + 1) end
  if ropts.query then
    local extra = encode_query(ropts.query)
    qs = (qs ~= "" and extra ~= "") and (qs .. "&" .. extra) or (qs .. extra)
  end
  local headers = {}
  for k, v in pairs(ropts.headers or {}) do headers[k:lower()] = v end
  local body = ropts.body or ""
  if ropts.json ~= nil then
    body = json.encode(ropts.json)
    headers["content-type"] = headers["content-type"] or "application/json"
  elseif ropts.form then
    body = encode_query(ropts.form)
    headers["content-type"] = headers["content-type"] or "application/x-www-form-urlencoded"
  end
  if body ~= "" then headers["content-length"] = tostring(#body) end
  headers.host = headers.host or "localhost"
  counter = counter + 1
  local raw = { method = method, path = path, query_string = qs, version = "1.1", headers = headers,
    body = body, remote_addr = ropts.remote_addr or "127.0.0.1", remote_port = 40000,
    id = format("test%014d", counter) }
  local status, rheaders, rbody = self.app:handle(raw)
  local res = { status = status, headers = {}, body = rbody }
  for k, v in pairs(rheaders or {}) do res.headers[k:lower()] = v end
  local ct = res.headers["content-type"]
  if type(rbody) == "string" and type(ct) == "string" and ct:find("json", 1, true) then
    res.json = json.decode(rbody)
  end
  return res
end

for _, m in ipairs({ "get", "post", "put", "patch", "delete", "head", "options" }) do
  local method = m:upper()
  Client[m] = function(self, path, ropts) return self:request(method, path, ropts) end
end

return _M
