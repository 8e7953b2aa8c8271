--- wxd.mp: WeChat message callbacks — Official Account (公众号), Mini
-- Program message push (小程序消息推送) and WeCom (企业微信).
--
-- `app:mp(path, cfg, handlers)` mounts one callback URL:
--
-- * GET: URL verification. Official Account and Mini Program: `signature`
--   = sha1 of the sorted token, timestamp and nonce, answered with
--   `echostr`. WeCom: `msg_signature` also covers `echostr`, which is
--   encrypted; the answer is its plaintext.
-- * POST: a message, in plaintext (`signature` only), compatible or safe
--   mode (`encrypt_type=aes` and `msg_signature` = sha1 of the sorted
--   token, timestamp, nonce and Encrypt, checked before anything is
--   decrypted). AES-256-CBC, key = base64(EncodingAESKey .. "="), IV = its
--   first 16 bytes, plaintext = 16 random bytes, 4-byte big-endian length,
--   message, receive id (appid, or CorpID for WeCom), PKCS#7 to 32 bytes.
--   Several EncodingAESKeys may be given (a key change); the reply uses the
--   one that decrypted the message. A timestamp outside the window is
--   refused. Every decryption failure gives the same answer.
-- * Dispatch: `handlers[MsgType]`, and for events `handlers.event[Event]`
--   (or `handlers.event` as one function), else `handlers.default`. A
--   handler gets `(msg, ctx)` and returns a reply built with `mp.reply.*`,
--   a string (a text reply), or nothing (the answer is "success").
-- * A message is handled once: WeChat's retries of a message (the same
--   MsgId from the same sender to the same account; for events and
--   messages without a MsgId, the same document: a SHA-256 of the
--   decrypted XML or JSON) wait for the first run and get its reply,
--   across workers (wxd.store). The record outlives every request that
--   could replay it (2 x timestamp_window + 60 s at least).
-- * Deadline: WeChat gives up after 5 s. A handler still running after
--   `deadline_ms` (4500) is answered "success" in time and keeps running;
--   its reply then goes out through the customer-service message API
--   (when `cfg.secret` is set: wxd.wechat fetches the access_token), or to
--   `cfg.on_late_reply(msg, reply, ctx)`; else it is logged as dropped.
--
-- docs/mp.md is the full contract.
--
-- @module wxd.mp
-- @usage
-- app:mp("/wx", wxd.config.mp, {
--   text = function(msg, ctx) return ctx.reply.text("echo: " .. msg.Content) end,
--   event = { subscribe = function(msg) return "welcome" end },
-- })

local json = require "wxd.json"
local crypto = require "wxd.crypto"
local xml = require "wxd.xml"
-- The arguments are checked once, here: the core's decode is called per message.
local xml_decode = require("wxd.core.xml").decode
local log = require "wxd.log"
local store = require "wxd.store"
local spawn = require("wxd.task").spawn
local core = require "wxd.core"

local type, error, pairs, ipairs, tostring, tonumber = type, error, pairs, ipairs, tostring, tonumber
local setmetatable, getmetatable, pcall, xpcall = setmetatable, getmetatable, pcall, xpcall
local floor, abs = math.floor, math.abs
local byte, sub, find, lower, format, match = string.byte, string.sub, string.find,
  string.lower, string.format, string.match
local concat, sort = table.concat, table.sort
local traceback = debug.traceback
local now, monotonic_ms = core.now, core.monotonic_ms
local sha1_hex, sha256_hex, equals = crypto.sha1_hex, crypto.sha256_hex, crypto.equals
-- Each protocol step in one native call (core/wxmsg.c).
local metrics = require "wxd.metrics"
local trace = require "wxd.trace"
local gray = require "wxd.gray"
local native = require "wxd.core.crypto"
local wx_signature, wx_verify, wx_decrypt, wx_encrypt, wx_seal, wx_open, wx_open_query =
  native.wx_signature, native.wx_verify, native.wx_decrypt, native.wx_encrypt, native.wx_seal, native.wx_open,
  native.wx_open_query

local _M = { _VERSION = "0.1.0" }

--- Message types and events the Official Account sends (handlers may
-- also name others: Mini Program and WeCom have a few more).
_M.MESSAGE_TYPES = { "text", "image", "voice", "video", "shortvideo", "location", "link" }
_M.EVENTS = { "subscribe", "unsubscribe", "SCAN", "LOCATION", "CLICK", "VIEW", "scancode_push",
              "scancode_waitmsg", "pic_sysphoto", "pic_photo_or_album", "pic_weixin", "location_select",
              "TEMPLATESENDJOBFINISH" }

local KINDS = { mp = true, miniprogram = true, wecom = true }

-- Messages are small (WeChat's are a few KiB): these bound the work a
-- request can cause before and after its signature is checked.
-- wxd.app's MAX_PARAMS (wxd.app sits above this module; a spec checks
-- that the two agree).
local MAX_QUERY_PARAMS = 1000
_M._MAX_QUERY_PARAMS = MAX_QUERY_PARAMS
local XML_OPTS = { arrays = { item = true }, max_depth = 10, max_elements = 1000 }

------------------------------------------------------------------------
-- Signatures and message encryption (the protocol, usable alone)
------------------------------------------------------------------------

--- WeChat's signature: sha1 (hex) of its arguments sorted as byte strings
-- and concatenated. With (token, timestamp, nonce) it is the URL
-- `signature`; with Encrypt added it is `msg_signature`.
-- @treturn string 40 lower-case hex characters
-- @usage mp.signature(token, timestamp, nonce, encrypt)
function _M.signature(...)
  local n, a, b, c, d = select("#", ...), ...
  if (n == 3 or n == 4) and type(a) == "string" and type(b) == "string" and type(c) == "string"
      and (d == nil or type(d) == "string") then
    return wx_signature(a, b, c, d)
  end
  local parts = { ... }
  for i = 1, #parts do
    if type(parts[i]) ~= "string" then
      error("wxd.mp.signature: argument " .. i .. " must be a string, got a " .. type(parts[i]), 2)
    end
  end
  sort(parts)
  return sha1_hex(concat(parts))
end
local signature = _M.signature

local ANY_TAIL = { ignore_tail_bits = true }

local KEY_MT = {
  __tostring = function() return "wxd.mp.aes_key (hidden)" end,
  __metatable = "wxd.mp.aes_key",
}

--- A message key from a 43-character EncodingAESKey.
-- @tparam string encoding_aes_key
-- @treturn[1] table an opaque key (tostring shows no byte of it)
-- @treturn[2] nil
-- @treturn[2] string "invalid aes key"
function _M.aes_key(encoding_aes_key)
  if type(encoding_aes_key) ~= "string" or #encoding_aes_key ~= 43 then
    return nil, "invalid aes key"
  end
  -- 43 random characters are not an encoder's output: the unused low bits
  -- of the last one are rarely zero, and WeChat ignores them.
  local key = crypto.base64_decode(encoding_aes_key .. "=", ANY_TAIL)
  if not key or #key ~= 32 then return nil, "invalid aes key" end
  return setmetatable({ key = key, iv = sub(key, 1, 16) }, KEY_MT)
end

local function as_key(k, fn)
  if getmetatable(k) == "wxd.mp.aes_key" then return k end
  local key = _M.aes_key(k)
  if not key then error("wxd.mp." .. fn .. ": key must be a 43-character EncodingAESKey or mp.aes_key()", 3) end
  return key
end

--- Encrypts a message for WeChat: base64 of AES-256-CBC over 16 random
-- bytes, the message length (4 bytes, big-endian), the message and the
-- receive id, padded (PKCS#7) to 32 bytes.
-- @tparam string|table key EncodingAESKey or mp.aes_key()
-- @tparam string message
-- @tparam string receive_id appid (CorpID for WeCom)
-- @tparam[opt] string random 16 bytes to use instead of fresh ones (tests
--   reproducing a published ciphertext)
-- @treturn string the Encrypt value
function _M.encrypt(key, message, receive_id, random)
  key = as_key(key, "encrypt")
  if type(message) ~= "string" or type(receive_id) ~= "string" then
    error("wxd.mp.encrypt: message and receive_id must be strings", 2)
  end
  if random ~= nil and (type(random) ~= "string" or #random ~= 16) then
    error("wxd.mp.encrypt: random must be 16 bytes", 2)
  end
  return wx_encrypt(key.key, message, receive_id, random)
end

--- Decrypts an Encrypt value and checks the receive id inside.
-- Check msg_signature first: an unauthenticated decryption answers
-- whether the padding was right.
-- @tparam string|table key EncodingAESKey or mp.aes_key()
-- @tparam string encrypted the Encrypt value (base64)
-- @tparam string receive_id the appid (CorpID) that must be inside
-- @treturn[1] string the message
-- @treturn[2] nil
-- @treturn[2] string "decrypt failed" whatever went wrong (base64,
--   padding, length, receive id)
function _M.decrypt(key, encrypted, receive_id)
  key = as_key(key, "decrypt")
  if type(encrypted) ~= "string" or type(receive_id) ~= "string" then
    error("wxd.mp.decrypt: encrypted and receive_id must be strings", 2)
  end
  return wx_decrypt(key.key, encrypted, receive_id)
end

------------------------------------------------------------------------
-- Replies
------------------------------------------------------------------------

local REPLY_MT = { __metatable = "wxd.mp.reply" }

local function is_reply(v)
  return type(v) == "table" and getmetatable(v) == "wxd.mp.reply"
end
_M.is_reply = is_reply

local function make_reply(t)
  return setmetatable(t, REPLY_MT)
end

local function check_str(v, what, level, optional)
  if optional and v == nil then return end
  if type(v) ~= "string" then
    error("wxd.mp.reply." .. what .. " must be a string, got a " .. type(v), level + 1)
  end
end

local function pick(t, a, b)
  local v = t[a]
  if v == nil then v = t[b] end
  return v
end

--- Passive reply builders. Each returns a reply object for a handler to
-- return; the sender, the receiver and CreateTime are filled in.
-- @table reply
_M.reply = {}

--- A text reply.
-- @usage return mp.reply.text("hello")
local TEXT_ORDER = { "Content" } -- shared by every text reply: render never changes it
function _M.reply.text(content)
  check_str(content, "text: content", 2)
  return make_reply({ MsgType = "text", Content = content, _order = TEXT_ORDER })
end

--- An image reply (a media_id from the material API).
function _M.reply.image(media_id)
  check_str(media_id, "image: media_id", 2)
  return make_reply({ MsgType = "image", Image = { MediaId = media_id } })
end

--- A voice reply.
function _M.reply.voice(media_id)
  check_str(media_id, "voice: media_id", 2)
  return make_reply({ MsgType = "voice", Voice = { MediaId = media_id } })
end

--- A video reply.
-- @tparam string media_id
-- @tparam[opt] string title
-- @tparam[opt] string description
function _M.reply.video(media_id, title, description)
  check_str(media_id, "video: media_id", 2)
  check_str(title, "video: title", 2, true)
  check_str(description, "video: description", 2, true)
  return make_reply({ MsgType = "video", Video = { MediaId = media_id, Title = title, Description = description,
    _order = { "MediaId", "Title", "Description" } } })
end

--- A music reply: `{ title, description, music_url, hq_music_url,
-- thumb_media_id }` (WeChat's own names, MusicUrl and so on, work too).
function _M.reply.music(m)
  if type(m) ~= "table" then error("wxd.mp.reply.music: expected a table", 2) end
  local music = {
    Title = pick(m, "title", "Title"), Description = pick(m, "description", "Description"),
    MusicUrl = pick(m, "music_url", "MusicUrl"), HQMusicUrl = pick(m, "hq_music_url", "HQMusicUrl"),
    ThumbMediaId = pick(m, "thumb_media_id", "ThumbMediaId"),
    _order = { "Title", "Description", "MusicUrl", "HQMusicUrl", "ThumbMediaId" },
  }
  for _, k in ipairs(music._order) do check_str(music[k], "music: " .. k, 2, k ~= "ThumbMediaId") end
  return make_reply({ MsgType = "music", Music = music })
end

--- A news (图文) reply: an array of 1..8 articles `{ title, description,
-- pic_url, url }` (or Title, Description, PicUrl, Url). WeChat shows only
-- the first one in reply to a user's message.
function _M.reply.news(articles)
  if type(articles) ~= "table" or #articles < 1 or #articles > 8 then
    error("wxd.mp.reply.news: expected an array of 1 to 8 articles", 2)
  end
  local items = {}
  for i, a in ipairs(articles) do
    if type(a) ~= "table" then error("wxd.mp.reply.news: article " .. i .. " must be a table", 2) end
    local it = { Title = pick(a, "title", "Title"), Description = pick(a, "description", "Description"),
      PicUrl = pick(a, "pic_url", "PicUrl"), Url = pick(a, "url", "Url"),
      _order = { "Title", "Description", "PicUrl", "Url" } }
    for _, k in ipairs(it._order) do check_str(it[k], "news: article " .. i .. " " .. k, 2, k ~= "Title") end
    items[i] = it
  end
  return make_reply({ MsgType = "news", ArticleCount = #items, Articles = { item = items },
                      _order = { "ArticleCount", "Articles" } })
end

--- Hands the conversation to the customer-service system (多客服),
-- optionally to one agent ("kf2001@account").
function _M.reply.transfer_customer_service(kf_account)
  check_str(kf_account, "transfer_customer_service: kf_account", 2, true)
  return make_reply({ MsgType = "transfer_customer_service",
                      TransInfo = kf_account and { KfAccount = kf_account } or nil })
end

local HEAD_ORDER = { "ToUserName", "FromUserName", "CreateTime", "MsgType" }

-- The reply's document (XML or JSON) for the message it answers.
-- The whole field order of a reply: the head, then its own _order. The
-- text reply's (the same _order table for every text reply) is built once.
local function full_order(own)
  local order = { HEAD_ORDER[1], HEAD_ORDER[2], HEAD_ORDER[3], HEAD_ORDER[4] }
  for _, k in ipairs(own or {}) do order[#order + 1] = k end
  return order
end
local TEXT_FULL_ORDER = full_order(TEXT_ORDER)

local function render(reply, msg, fmt)
  local t = { ToUserName = msg.FromUserName, FromUserName = msg.ToUserName,
              CreateTime = floor(now()), MsgType = reply.MsgType }
  for k, v in pairs(reply) do
    if k ~= "_order" and t[k] == nil then t[k] = v end
  end
  if fmt == "json" then
    local function strip(x)
      if type(x) ~= "table" then return x end
      local c = {}
      for k, v in pairs(x) do if k ~= "_order" then c[k] = strip(v) end end
      return c
    end
    return json.encode(strip(t))
  end
  local own = reply._order
  t._order = own == TEXT_ORDER and TEXT_FULL_ORDER or full_order(own)
  return xml.encode(t)
end
_M.render = render

--- The customer-service message (客服消息, /cgi-bin/message/custom/send)
-- that carries a reply to `openid`: how a reply goes out once the passive
-- answer's 5 seconds are over.
-- @treturn[1] table the message
-- @treturn[2] nil
-- @treturn[2] string why there is none ("transfer_customer_service" has no
--   equivalent)
function _M.custom_message(reply, openid)
  if not is_reply(reply) then error("wxd.mp.custom_message: expected a reply (mp.reply.*)", 2) end
  if type(openid) ~= "string" or openid == "" then error("wxd.mp.custom_message: openid must be a string", 2) end
  local t = reply.MsgType
  local m = { touser = openid, msgtype = t }
  if t == "text" then
    m.text = { content = reply.Content }
  elseif t == "image" or t == "voice" then
    m[t] = { media_id = reply[t == "image" and "Image" or "Voice"].MediaId }
  elseif t == "video" then
    local v = reply.Video
    m.video = { media_id = v.MediaId, title = v.Title, description = v.Description }
  elseif t == "music" then
    local v = reply.Music
    m.music = { title = v.Title, description = v.Description, musicurl = v.MusicUrl, hqmusicurl = v.HQMusicUrl,
                thumb_media_id = v.ThumbMediaId }
  elseif t == "news" then
    -- The API takes one article (WeChat's rule since 2018).
    local a = reply.Articles.item[1]
    m.news = { articles = { { title = a.Title, description = a.Description, url = a.Url, picurl = a.PicUrl } } }
  else
    return nil, "a " .. tostring(t) .. " reply has no customer-service equivalent"
  end
  return m
end

------------------------------------------------------------------------
-- The endpoint
------------------------------------------------------------------------

local Endpoint = {}
Endpoint.__index = Endpoint

local TEXT_CT = "text/plain; charset=utf-8"

local function positive(cfg, name, default, max)
  local v = cfg[name]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v or v <= 0 or v > max then
    error("wxd.mp: cfg." .. name .. " must be a number in (0, " .. max .. "], got " .. tostring(v), 4)
  end
  return v
end

local function load_keys(cfg)
  local list = {}
  local function add(v, name)
    if v == nil or v == false or v == "" then return end -- env("...", false): unset
    if type(v) == "string" then v = { v } end
    if type(v) ~= "table" then error("wxd.mp: cfg." .. name .. " must be a string or an array of strings", 5) end
    for i, s in ipairs(v) do
      local k = _M.aes_key(s)
      -- The key itself is never part of the message.
      if not k then error("wxd.mp: cfg." .. name .. "[" .. i .. "] is not a 43-character EncodingAESKey", 5) end
      list[#list + 1] = k
    end
  end
  add(cfg.aes_key, "aes_key")
  add(cfg.aes_keys, "aes_keys")
  return list
end

local function new_endpoint(path, cfg, handlers)
  if type(cfg) ~= "table" then error("wxd.mp: cfg must be a table (e.g. wxd.config.mp)", 3) end
  if type(handlers) == "function" then handlers = { default = handlers } end
  if type(handlers) ~= "table" then error("wxd.mp: handlers must be a table or a function", 3) end
  for k, v in pairs(handlers) do
    if type(k) ~= "string" then error("wxd.mp: handler names must be strings", 3) end
    if k == "event" then
      if type(v) == "table" then
        for ek, ev in pairs(v) do
          if type(ev) ~= "function" then error("wxd.mp: handlers.event." .. tostring(ek) .. " must be a function", 3) end
        end
      elseif type(v) ~= "function" then
        error("wxd.mp: handlers.event must be a function or a table of functions by Event", 3)
      end
    elseif type(v) ~= "function" then
      error("wxd.mp: handlers." .. k .. " must be a function", 3)
    end
  end
  local kind = cfg.kind or "mp"
  if not KINDS[kind] then error('wxd.mp: cfg.kind must be "mp", "miniprogram" or "wecom"', 3) end
  if type(cfg.token) ~= "string" or cfg.token == "" then
    error("wxd.mp: cfg.token must be a non-empty string (set it from the environment)", 3)
  end
  local keys = load_keys(cfg)
  local raw_keys = {} -- the 32-byte keys, for the native calls
  for i, k in ipairs(keys) do raw_keys[i] = k.key end
  local receive_id = cfg.receive_id or (kind == "wecom" and cfg.corp_id or cfg.appid) or nil
  if receive_id ~= nil and (type(receive_id) ~= "string" or receive_id == "") then
    error("wxd.mp: cfg." .. (kind == "wecom" and "corp_id" or "appid") .. " must be a non-empty string", 3)
  end
  if #keys > 0 and not receive_id then
    error("wxd.mp: cfg." .. (kind == "wecom" and "corp_id" or "appid") .. " is needed to check encrypted messages", 3)
  end
  if kind == "wecom" and #keys == 0 then error("wxd.mp: WeCom callbacks need cfg.aes_key", 3) end
  local window = cfg.timestamp_window
  if window == nil then window = 300 end
  if window ~= false and (type(window) ~= "number" or window <= 0) then
    error("wxd.mp: cfg.timestamp_window must be a number of seconds, or false to turn the check off", 3)
  end
  if cfg.on_late_reply ~= nil and type(cfg.on_late_reply) ~= "function" then
    error("wxd.mp: cfg.on_late_reply must be a function(msg, reply, ctx)", 3)
  end
  -- Late replies go out through the customer-service API when the app's
  -- secret is known (Official Account and Mini Program; WeCom's API differs).
  local client = cfg.client
  if client == nil and type(cfg.secret) == "string" and cfg.secret ~= "" and kind ~= "wecom" and receive_id then
    client = require("wxd.wechat").client({ appid = receive_id, secret = cfg.secret, api_base = cfg.api_base or nil,
                                            token_mode = cfg.token_mode })
  end
  if client ~= nil and (type(client) ~= "table" or type(client.send_custom) ~= "function") then
    error("wxd.mp: cfg.client must be a wxd.wechat client", 3)
  end
  local deadline_ms = positive(cfg, "deadline_ms", 4500, 60000)
  -- A signed request is accepted while |now - timestamp| <= window, which
  -- is 2 x window seconds: a record that expired sooner would let a replay
  -- of the request run the handler again. The margin covers the clocks of
  -- nodes that share a Redis store.
  local replay_span = window and 2 * window + 60 or 360
  local dedup_ttl = positive(cfg, "dedup_ttl", replay_span, 86400 * 30)
  if dedup_ttl < replay_span then
    log.warn("mp: dedup_ttl raised to outlive the timestamp window (2 x window + 60 s)",
      { path = path, dedup_ttl = dedup_ttl, used = replay_span })
    dedup_ttl = replay_span
  end
  local allow_plaintext = cfg.allow_plaintext
  if allow_plaintext == nil then allow_plaintext = #keys == 0 end
  local self = setmetatable({
    path = path,
    kind = kind,
    token = cfg.token,
    keys = keys,
    raw_keys = raw_keys,
    receive_id = receive_id,
    window = window,
    allow_plaintext = allow_plaintext and kind ~= "wecom",
    json = kind == "miniprogram",
    open_query = #keys > 0 and kind ~= "miniprogram", -- see Endpoint:receive
    deadline_ms = deadline_ms,
    max_body_bytes = positive(cfg, "max_body_bytes", 64 * 1024, 1024 * 1024 * 1024),
    dedup_ttl = dedup_ttl,
    -- A run's claim (the PENDING record) outlives the deadline by far, so
    -- that a retry never starts a second run of a slow handler.
    claim_ttl = positive(cfg, "handler_timeout", math.max(60, deadline_ms / 1000 * 4), 86400),
    on_late_reply = cfg.on_late_reply,
    client = client or nil,
    handlers = handlers,
    prefix = "wxd:mp:" .. kind .. ":" .. (receive_id or sha1_hex(cfg.token):sub(1, 12)) .. ":",
  }, Endpoint)
  return self
end

-- Refusals: logged with the reason; the sender learns only the status.
local BODIES = { [400] = "bad request\n", [403] = "forbidden\n", [413] = "request body too large\n" }

-- Messages by type and outcome: handled, duplicate, late (past the
-- deadline), no_handler, or refused (with the reason).
local messages_metric
-- series[outcome][reason][type]: each label set is resolved once (no label
-- table, no key string per message). Bounded like the metric itself: a set
-- that did not fit counts as "other" and is not kept.
local MESSAGE_SERIES_MAX = 500
local message_series, message_series_n = {}, 0

local function count_message(msg_type, outcome, reason)
  if not metrics.enabled then return end
  msg_type, reason = msg_type or "", reason or ""
  local by_reason = message_series[outcome]
  if not by_reason then
    by_reason = {}
    message_series[outcome] = by_reason
  end
  local by_type = by_reason[reason]
  if not by_type then
    by_type = {}
    by_reason[reason] = by_type
  end
  local series = by_type[msg_type]
  if not series then
    if not messages_metric then
      messages_metric = metrics.builtin("counter", "wxd_mp_messages_total",
        "Official Account messages, by type, outcome (handled, duplicate, late, no_handler, refused) and reason",
        { "type", "outcome", "reason" }, { max_series = MESSAGE_SERIES_MAX })
    end
    local other
    series, other = metrics.series(messages_metric, { msg_type, outcome, reason })
    if not other and message_series_n < MESSAGE_SERIES_MAX then
      by_type[msg_type] = series
      message_series_n = message_series_n + 1
    end
  end
  metrics.add(series)
end

local function refuse(self, req, status, reason)
  count_message(nil, "refused", reason)
  log.warn("mp: request refused", { reason = reason, path = self.path, status = status,
    remote = req.remote_addr })
  return status, BODIES[status]
end

-- The query's timestamp, checked against the window.
local function check_query(self, _req, q, names)
  for _, name in ipairs(names) do
    local v = q[name]
    if type(v) ~= "string" or v == "" or #v > 4096 then return 400, "missing or oversized " .. name end
  end
  local ts = q.timestamp
  if #ts > 12 then return 400, "malformed timestamp" end
  for i = 1, #ts do -- digits only (no pattern: this runs per message)
    local b = byte(ts, i)
    if b < 48 or b > 57 then return 400, "malformed timestamp" end
  end
  if #q.nonce > 128 then return 400, "nonce too long" end
  if self.window and abs(now() - tonumber(q.timestamp)) > self.window then
    return 403, "timestamp outside the window"
  end
  return nil
end

local function set_text(res)
  res.headers["content-type"] = TEXT_CT
  res.headers["x-content-type-options"] = "nosniff"
end

-- GET: URL verification.
function Endpoint:verify(req, res)
  local q = req.query
  if self.kind == "wecom" then
    local st, why = check_query(self, req, q, { "msg_signature", "timestamp", "nonce", "echostr" })
    if st then return refuse(self, req, st, why) end
    if not equals(signature(self.token, q.timestamp, q.nonce, q.echostr), q.msg_signature) then
      return refuse(self, req, 403, "bad msg_signature")
    end
    for _, key in ipairs(self.keys) do
      local plain = _M.decrypt(key, q.echostr, self.receive_id)
      if plain then
        set_text(res)
        return 200, plain
      end
    end
    return refuse(self, req, 400, "echostr does not decrypt")
  end
  local st, why = check_query(self, req, q, { "signature", "timestamp", "nonce", "echostr" })
  if st then return refuse(self, req, st, why) end
  if not equals(signature(self.token, q.timestamp, q.nonce), q.signature) then
    return refuse(self, req, 403, "bad signature")
  end
  set_text(res)
  return 200, q.echostr
end

-- JSON that the decoder already accepted, scanned without decoding: the index
-- just past the string that opens at i, or past the value that starts at i.
local function skip_string(s, i)
  while true do
    local j = find(s, '["\\]', i + 1)
    if byte(s, j) == 34 then return j + 1 end
    i = j + 1 -- a backslash: the next character is escaped
  end
end

local OPEN = { [123] = true, [91] = true }   -- { [
local CLOSE = { [125] = true, [93] = true }  -- } ]

local function skip_value(s, i)
  local c = byte(s, i)
  if c == 34 then return skip_string(s, i) end
  if not OPEN[c] then return (find(s, "[,}%]%s]", i)) or #s + 1 end
  local depth = 0
  while true do
    c = byte(s, i)
    if c == 34 then
      i = skip_string(s, i)
    else
      if OPEN[c] then depth = depth + 1 elseif CLOSE[c] then depth = depth - 1 end
      i = i + 1
      if depth == 0 then return i end
    end
    i = find(s, '[][{}"]', i)
  end
end

-- The text of the value of the object's own member `name` in a JSON body
-- that json.decode accepted (the last one, as the decoder keeps), never one of a nested
-- object; nil if absent.
local function member_text(body, name)
  local ok, text = pcall(function()
    local found
    local i = find(body, "{", 1, true) + 1
    while true do
      i = find(body, "%S", i)
      local c = byte(body, i)
      if c == 125 then return found end -- }
      if c == 44 then i = find(body, "%S", i + 1) end -- ,
      local after = skip_string(body, i)
      local key = sub(body, i + 1, after - 2)
      if find(key, "\\", 1, true) then key = json.decode(sub(body, i, after - 1)) end
      i = find(body, "%S", find(body, ":", after, true) + 1)
      local stop = skip_value(body, i)
      if key == name then found = sub(body, i, stop - 1) end
      i = stop
    end
  end)
  return ok and text or nil
end

-- Parses a body (XML or, for the Mini Program, JSON): table, format | nil, reason.
local function parse(self, body)
  local first = byte(body, 1)
  if first ~= 60 and first ~= 123 then -- leading white space: rare
    local i = find(body, "[^ \t\r\n]")
    first = i and byte(body, i)
  end
  if first == 60 then -- "<"
    local t, err, detail = xml_decode(body, self.max_body_bytes, XML_OPTS.max_depth, XML_OPTS.max_elements,
                                      XML_OPTS.arrays)
    if not t then return nil, err .. (detail and (" (" .. detail .. ")") or "") end
    return t, "xml"
  elseif first == 123 and self.json then -- "{"
    local t = json.decode(body)
    if type(t) ~= "table" then return nil, "invalid json" end
    -- A MsgId is a 64-bit integer: as a JSON number it loses digits in a
    -- double, so its digits are read again from the text of the object's
    -- own member (the XML form is a string).
    if type(t.MsgId) == "number" then
      local raw = member_text(body, "MsgId")
      t.MsgId = raw and match(raw, "^%-?%d+$") or format("%.17g", t.MsgId)
    end
    return t, "json"
  end
  return nil, "not " .. (self.json and "XML or JSON" or "XML")
end

local function field(v)
  v = v == nil and "" or tostring(v)
  return #v .. ":" .. v
end

-- The identity under which WeChat's retries of a message are recognised.
-- A message: its MsgId, which WeChat does not promise unique across users
-- or accounts, scoped by sender and account (another user's MsgId never
-- finds this one's reply). An event has no MsgId in general
-- (TEMPLATESENDJOBFINISH has a MsgID; WeCom's contact changes all come from
-- "sys"), and two distinct ones can share sender, CreateTime and Event: its
-- identity is its whole document, which a retry repeats (the decrypted
-- text: the encryption's random prefix does not count).
local function dedup_id(msg, doc)
  local id = msg.MsgId
  if id == nil then id = msg.MsgID end
  if id ~= nil and msg.MsgType ~= "event" then
    return "m:" .. sha256_hex(field(msg.FromUserName) .. field(msg.ToUserName) .. field(id))
  end
  return "d:" .. sha256_hex(doc)
end

local function find_handler(handlers, msg)
  local mt = msg.MsgType
  if mt == "event" then
    local ev = handlers.event
    if type(ev) == "function" then return ev end
    if type(ev) == "table" then
      local e = msg.Event
      if type(e) == "string" then
        local f = ev[e] or ev[lower(e)]
        if f then return f end
      end
      if ev.default then return ev.default end
    end
  elseif type(mt) == "string" and mt ~= "default" then
    local f = handlers[mt]
    if f then return f end
  end
  return handlers.default
end

-- Records in the store: a run in progress (the claim, for handler_timeout),
-- or the reply sent (plain, for dedup_ttl).
local PENDING = "p"

local function late(self, task, reply)
  if self.on_late_reply then
    local ok, err = pcall(self.on_late_reply, task.msg, reply, task.ctx)
    if not ok then
      log.error("mp: on_late_reply failed", { error = tostring(err), path = self.path })
    end
    return
  end
  local openid = task.msg.FromUserName
  if not self.client then
    log.warn("late reply dropped: no customer-service sender (set cfg.secret, or cfg.on_late_reply)",
      { path = self.path, openid = openid, msg_type = task.msg.MsgType })
    return
  end
  if type(openid) ~= "string" or openid == "" then
    log.warn("late reply dropped: the message has no FromUserName", { path = self.path, msg_type = task.msg.MsgType })
    return
  end
  local message, why = _M.custom_message(reply, openid)
  if not message then
    log.warn("late reply dropped: " .. why, { path = self.path, openid = openid, reply_type = reply.MsgType })
    return
  end
  local pok, ok, err, info = pcall(self.client.send_custom, self.client, message)
  if not pok then ok, err, info = nil, "error", { errmsg = tostring(ok) } end
  if ok then
    log.info("mp: late reply sent through the customer-service API", { path = self.path, openid = openid })
  else
    log.warn("mp: late reply not sent", { path = self.path, openid = openid, error = err,
                                          errcode = info and info.errcode, errmsg = info and info.errmsg })
  end
end

-- Runs the handler and sets task.body, the plain reply; a reply that
-- comes after the request answered goes out late.
local function run_handler(self, task)
  local msg, ctx = task.msg, task.ctx
  local ok, out = xpcall(task.fn, traceback, msg, ctx)
  local reply, body = nil, "success"
  if not ok then
    log.error("mp: handler error", { error = tostring(out), path = self.path, msg_type = msg.MsgType })
  elseif type(out) == "string" then
    reply = _M.reply.text(out)
  elseif is_reply(out) then
    reply = out
  elseif out ~= nil then
    log.error("mp: a handler returned a " .. type(out) .. "; expected a reply (mp.reply.*), a string or nothing",
              { path = self.path, msg_type = msg.MsgType })
  end
  if reply then
    local rok, rendered = pcall(render, reply, msg, task.format)
    if rok and rendered then
      body = rendered
    else
      log.error("mp: reply cannot be rendered", { error = tostring(rendered), path = self.path })
      reply = nil
    end
  end
  if task.answered then
    -- The request already answered "success" at the deadline.
    task.body = "success"
    if reply then late(self, task, reply) end
  else
    task.body = body
  end
end

-- Runs the handler (in a task: the request can answer in time while it
-- goes on) and records its reply over the claim: the one write of a run,
-- which also wakes the retries waiting on the claim. No error on the way
-- may skip it: retries would wait for their deadline.
local function run_task(self, task)
  local ok, err = xpcall(run_handler, traceback, self, task)
  if not ok then
    log.error("mp: message handling failed", { error = tostring(err), path = self.path })
  end
  local body = task.body or "success"
  local pok, set, serr = pcall(store.set, task.key, "r" .. body, self.dedup_ttl)
  if not pok or not set then
    log.warn("mp: reply not recorded for retries", { error = tostring(pok and serr or set), path = self.path })
  end
  task.body = body
  task.done = true
end

local function record_body(rec)
  if rec and sub(rec, 1, 1) == "r" then return sub(rec, 2) end
  return nil
end

local function seconds_left(deadline)
  local left = deadline - monotonic_ms()
  return left > 0 and left / 1000 or 0
end

-- Runs the message's handler once (across retries and workers) and
-- returns the plain reply body, or nil to answer "success". `doc` is the
-- message's document as received (decrypted if it was encrypted).
--
-- One key per message, two store writes per run: the first delivery
-- claims the key with an add of PENDING that lasts handler_timeout, and
-- the run's end sets the reply over it for dedup_ttl. The handler runs as
-- a task, which usually ends inside spawn: no loop turn, no timer. A retry
-- whose add finds the key reads it: a reply is answered at once; PENDING
-- (the run goes on) is waited away from natively (the shdict wakes the
-- retry the moment the reply is set; the Redis store polls) until the
-- retry's deadline. A claim that expired (a run past handler_timeout) is
-- taken anew: a second run may start only then.
function Endpoint:dispatch(_req, msg, ctx, doc, id)
  local deadline = monotonic_ms() + self.deadline_ms
  local key = self.prefix .. (id or dedup_id(msg, doc))
  local added, why = store.add(key, PENDING, self.claim_ttl)
  while not added do
    local rec
    if why == "exists" then
      rec, why = store.wait_change(key, PENDING, seconds_left(deadline))
    end
    if rec ~= nil or why ~= nil then
      -- A reply (the same as the first delivery's); or still PENDING at our
      -- deadline ("timeout": "success" as before); or a store error.
      if why ~= nil and why ~= "timeout" then log.warn("mp: dedup store failed", { error = tostring(why) }) end
      count_message(msg.MsgType, "duplicate")
      return record_body(rec)
    end
    -- The claim went away without a reply (expired past handler_timeout,
    -- evicted): claim it again.
    added, why = store.add(key, PENDING, self.claim_ttl)
  end
  local fn = find_handler(self.handlers, msg)
  if not fn then
    store.set(key, "rsuccess", self.dedup_ttl)
    count_message(msg.MsgType, "no_handler")
    return nil
  end
  local t = { msg = msg, ctx = ctx, fn = fn, key = key, format = ctx.format }
  local h = spawn(run_task, self, t)
  if not t.done then
    local left = deadline - monotonic_ms()
    h:wait(left > 0 and left or 0)
  end
  if t.done then
    count_message(msg.MsgType, "handled")
    return t.body
  end
  count_message(msg.MsgType, "late")
  t.answered = true
  log.warn("mp: handler past the deadline; answered success",
    { path = self.path, deadline_ms = self.deadline_ms, msg_type = msg.MsgType })
  return nil
end

-- The reply as sent: encrypted and signed when the message was.
function Endpoint:seal(body, key, fmt)
  return wx_seal(self.token, key.key, self.receive_id, body, floor(now()), fmt == "json" and "json" or "xml")
end

-- POST: a message.
function Endpoint:receive(req, res)
  local body = req.body or ""
  if #body > self.max_body_bytes then return refuse(self, req, 413, "body over max_body_bytes") end
  local msg, fmt, mode, key, doc, id
  local qs = self.open_query and byte(body, 1) == 60 and rawget(req, "query") == nil and rawget(req, "query_string")
  if qs then
    -- The usual case, an encrypted XML message, with no query table: the
    -- query string is read in C with check_query's rules and reasons, then
    -- as wx_open below. false: not that case, the general path decides.
    local m, a, b, compatible, d = wx_open_query(self.token, qs, body, self.receive_id, self.raw_keys,
      self.max_body_bytes, XML_OPTS.max_depth, XML_OPTS.max_elements, XML_OPTS.arrays, now(), self.window,
      MAX_QUERY_PARAMS, self.kind == "wecom")
    if m then
      msg, fmt, key, id = m, "xml", self.keys[b], d
      mode = (self.kind ~= "wecom" and compatible) and "compatible" or "safe"
    elseif m == nil then
      return refuse(self, req, b, a)
    end
  end
  if not msg then
    msg, fmt, mode, key, doc, id = self:open(req, body)
    if not msg then return refuse(self, req, mode, fmt) end
  end
  return self:answer(req, res, msg, fmt, mode, key, doc, id)
end

-- The general path: every mode and format. msg, fmt, mode, key, doc, id |
-- nil, reason, status.
function Endpoint:open(req, body)
  local q = req.query
  local encrypted = self.kind == "wecom" or q.encrypt_type == "aes"
  if q.encrypt_type ~= nil and q.encrypt_type ~= "aes" and q.encrypt_type ~= "raw" then
    return nil, "unknown encrypt_type", 400
  end
  local msg, fmt, mode, key, doc, id
  if encrypted and not self.json and byte(body, 1) == 60 then
    -- XML, encrypted: one native call from the body to the message table
    -- (core/wxmsg.c), in the same order as below: the signature over the
    -- Encrypt value holds before anything is decrypted.
    if #self.keys == 0 then return nil, "encrypted message but no aes_key configured", 400 end
    local st, why = check_query(self, req, q, { "msg_signature", "timestamp", "nonce" })
    if st then return nil, why, st end
    -- msg, key index, compatible, dedup id | nil, reason, status
    local m, a, b, compatible, d = wx_open(self.token, q.timestamp, q.nonce, q.msg_signature, body,
      self.receive_id, self.raw_keys, self.max_body_bytes, XML_OPTS.max_depth, XML_OPTS.max_elements,
      XML_OPTS.arrays)
    if not m then return nil, a, b end
    msg, fmt, key, id = m, "xml", self.keys[b], d
    mode = (self.kind ~= "wecom" and compatible) and "compatible" or "safe"
  elseif encrypted then
    if #self.keys == 0 then return nil, "encrypted message but no aes_key configured", 400 end
    local st, why = check_query(self, req, q, { "msg_signature", "timestamp", "nonce" })
    if st then return nil, why, st end
    local outer, ofmt = parse(self, body)
    if not outer then return nil, ofmt, 400 end
    local enc = outer.Encrypt
    if type(enc) ~= "string" or enc == "" then return nil, "no Encrypt field", 400 end
    -- The signature covers the ciphertext: nothing is decrypted before it holds.
    if not wx_verify(q.msg_signature, self.token, q.timestamp, q.nonce, enc) then
      return nil, "bad msg_signature", 403
    end
    local plain
    for _, k in ipairs(self.keys) do
      plain = _M.decrypt(k, enc, self.receive_id)
      if plain then
        key = k
        break
      end
    end
    if not plain then return nil, "decrypt failed", 400 end
    local inner, ifmt = parse(self, plain)
    if not inner then return nil, "decrypted message: " .. ifmt, 400 end
    msg, fmt, doc = inner, ifmt, plain
    mode = (self.kind ~= "wecom" and outer.MsgType ~= nil) and "compatible" or "safe"
  else
    if not self.allow_plaintext then
      return nil, "plaintext message but encryption is configured (cfg.allow_plaintext)", 403
    end
    local st, why = check_query(self, req, q, { "signature", "timestamp", "nonce" })
    if st then return nil, why, st end
    if not equals(signature(self.token, q.timestamp, q.nonce), q.signature) then
      return nil, "bad signature", 403
    end
    local m, mfmt = parse(self, body)
    if not m then return nil, mfmt, 400 end
    msg, fmt, mode, doc = m, mfmt, "plaintext", body
  end
  return msg, fmt, mode, key, doc, id
end

-- Dispatches an opened message and answers.
function Endpoint:answer(req, res, msg, fmt, mode, key, doc, id)
  -- The sender becomes part of the request's context (logged masked,
  -- forwarded to allowed hosts only).
  if type(msg.FromUserName) == "string" then
    trace.set_openid(msg.FromUserName)
    -- Gray rules keyed on the openid can decide now (wxd.gray).
    if rawget(req, "_gray_wait") then gray.refresh(req, msg.FromUserName) end
  end
  local ctx = { req = req, kind = self.kind, mode = mode, format = fmt, appid = self.receive_id,
                reply = _M.reply, path = self.path }
  local out = self:dispatch(req, msg, ctx, doc, id)
  if out == nil or out == "success" or out == "" then
    set_text(res)
    return 200, "success"
  end
  if key then out = self:seal(out, key, fmt) end
  res.headers["content-type"] = fmt == "json" and "application/json" or "application/xml; charset=utf-8"
  return 200, out
end

--- Mounts a callback URL on an app (what `app:mp` calls).
-- @tparam table app a wxd.app
-- @tparam string path e.g. "/wx"
-- @tparam table cfg `token` (required), `appid` (the receive id; `corp_id`
--   for WeCom), `aes_key` (one EncodingAESKey or an array: a key change),
--   `kind` ("mp", "miniprogram" or "wecom"), `timestamp_window` (seconds,
--   default 300; false: off), `deadline_ms` (4500), `dedup_ttl` (seconds,
--   at least and by default 2 x window + 60), `max_body_bytes` (64 KiB),
--   `allow_plaintext` (default: only when no aes_key is set), `secret` and
--   `api_base` (late replies go
--   out through the customer-service API: see wxd.wechat), `client` (a
--   wxd.wechat client instead), `on_late_reply(msg, reply, ctx)`
-- @tparam table|function handlers by MsgType (`text`, `image`, ...),
--   `event` (a function, or a table by Event), `default`
-- @treturn table the app
function _M.mount(app, path, cfg, handlers)
  if type(path) ~= "string" then error("wxd.mp: path must be a string", 2) end
  local self = new_endpoint(path, cfg, handlers)
  app:get(path, function(req, res) return self:verify(req, res) end)
  app:post(path, function(req, res) return self:receive(req, res) end)
  return app
end

return _M
