--- wxd.log: structured logging (JSON lines on stderr, written by the core).
-- `log.info("order paid", { order = id, openid = o })` writes
-- {"ts":...,"level":"info","worker":0,"msg":"order paid","order":"...","openid":"oAbc****wxyz"}.
-- Secrets are never written: fields whose names look like a secret are
-- replaced by "***"; openids (FromUserName and ToUserName too) and phone
-- numbers are masked. Names match in any case, with or without "-"/"_".
-- @module wxd.log

local core = require "wxd.core"
local trace_ids = require("wxd.trace").ids
local json_encode = require("wxd.json").encode

local type, pairs, tostring, sub, lower, find, pcall = type, pairs, tostring, string.sub, string.lower,
  string.find, pcall
local core_log, log_enabled = core.log, core.log_enabled

local _M = {}

-- Names are compared normalised: lower case, without "-" and "_", so that
-- sessionKey, session-key and session_key are one name. Everything config
-- refuses as a literal secret is hidden too.
local util = require "wxd.util"
local is_config_secret = util.is_secret_key
-- A name that contains one of these holds a secret: WeChat's and WeChat
-- Pay's own names (AppSecret, EncodingAESKey, session_key, APIv3 key,
-- merchant key, the js_code a session_key is bought with), and the generic
-- ones (tokens, tickets, passwords, credentials in headers).
local SECRET_PARTS = { "secret", "password", "passwd", "passphrase", "token", "ticket", "sessionkey",
  "aeskey", "apikey", "apiv3key", "mchkey", "privatekey", "signkey", "accesskey",
  "authorization", "cookie", "jscode" }
-- Whole names that are secrets (a bare "key" is WeChat Pay v2's merchant key).
local SECRET_NAMES = { key = true }
-- Names that identify a person: openid and unionid, phone numbers, and
-- WeChat's message fields that carry an openid. ToUserName is the account's
-- own id in a message but the user's openid in a reply, so it is masked too.
local PERSON_PARTS = { "openid", "unionid", "phone", "mobile" }
local PERSON_NAMES = { fromusername = true, tousername = true, touser = true, externaluserid = true }

local normalise = util.key_name

local function contains_any(name, parts)
  for i = 1, #parts do
    if find(name, parts[i], 1, true) then return true end
  end
  return false
end

local function is_secret(name, norm)
  return SECRET_NAMES[norm] or contains_any(norm, SECRET_PARTS) or is_config_secret(name)
end

local function is_person(norm)
  return PERSON_NAMES[norm] or contains_any(norm, PERSON_PARTS)
end

-- Fields of the line itself; a user field of the same name is renamed.
local RESERVED = { ts = true, level = true, worker = true, msg = true, trace_id = true, span_id = true,
  request_id = true }
-- Long values (tracebacks, bodies) are cut so the line stays whole.
local MAX_VALUE = 4000

--- Masks the middle of an identifier, keeping enough to correlate lines.
function _M.mask(v)
  v = tostring(v)
  local n = #v
  if n <= 8 then return string.rep("*", n) end
  if n == 11 and v:match("^%d+$") then return sub(v, 1, 3) .. "****" .. sub(v, 8) end
  return sub(v, 1, 4) .. "****" .. sub(v, -4)
end

local function scrub(fields, depth)
  local out = {}
  for k, v in pairs(fields) do
    local name = lower(tostring(k))
    local norm = normalise(name)
    if not depth and RESERVED[name] then k = "field_" .. tostring(k) end
    if is_secret(name, norm) then
      out[k] = "***"
    elseif is_person(norm) then
      out[k] = _M.mask(v)
    elseif type(v) == "table" then
      out[k] = scrub(v, (depth or 0) + 1)
    elseif type(v) == "string" and #v > MAX_VALUE then
      out[k] = sub(v, 1, MAX_VALUE) .. "...(truncated)"
    elseif type(v) == "function" or type(v) == "userdata" or type(v) == "thread" then
      out[k] = tostring(v)
    else
      out[k] = v
    end
  end
  return out
end
_M.scrub = function(fields) return scrub(fields) end

local function write(level, msg, fields)
  if not log_enabled(level) then return end
  local extra
  if fields ~= nil then
    if type(fields) ~= "table" then error("log fields must be a table", 3) end
    -- wxd.json writes valid UTF-8 whatever the strings hold, so the line
    -- stays valid JSON; fields it cannot encode are named, not dropped.
    local scrubbed = scrub(fields)
    local ok, json = pcall(json_encode, scrubbed)
    if not ok then
      json = json_encode({ log_fields_error = tostring(json) })
    elseif sub(json, 1, 1) ~= "{" then -- a list: its items cannot be fields of the line
      json = json_encode({ fields = scrubbed })
    end
    if #json > 2 then extra = sub(json, 2, -2) end
  end
  -- Inside a request: its ids (safe characters only: no escaping needed).
  local tid, sid, rid, openid = trace_ids()
  if tid then
    local ids = '"trace_id":"' .. tid .. '","span_id":"' .. sid .. '","request_id":"' .. rid .. '"'
    if openid and not (fields and fields.openid) then ids = ids .. ',"openid":"' .. _M.mask(openid) .. '"' end
    extra = extra and extra .. "," .. ids or ids
  end
  core_log(level, tostring(msg), extra)
end

function _M.debug(msg, fields) write("debug", msg, fields) end
function _M.info(msg, fields) write("info", msg, fields) end
function _M.warn(msg, fields) write("warn", msg, fields) end
function _M.error(msg, fields) write("error", msg, fields) end

return _M
