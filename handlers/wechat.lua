-- WeChat Official Account messages of the default app, at /wx. Edit freely:
-- this is your code.
--
-- Set WXD_MP_APPID and WXD_MP_TOKEN (and WXD_MP_AES_KEY for compatible or
-- safe mode) to mount /wx; without them the app serves its other routes and
-- says so in one log line. With WXD_MP_SECRET too, a reply that misses
-- WeChat's 5 seconds goes out through the customer-service API, and
-- GET /jssdk/config?url=... serves the JS-SDK configuration of a page
-- (WXD_WECHAT_API_BASE points both at another API host, e.g. a test fake).
-- An `mp` section in config.lua, if you add one, takes precedence:
--
--   mp = { appid = env("WXD_MP_APPID"), token = env("WXD_MP_TOKEN"),
--          aes_key = env("WXD_MP_AES_KEY", false), secret = env("WXD_MP_SECRET", false) },
local wxd = require "wxd"
local log = require "wxd.log"

local handlers = {
  text = function(msg, ctx)
    return ctx.reply.text("echo: " .. msg.Content)
  end,
  event = {
    subscribe = function(_msg, ctx)
      return ctx.reply.text("Welcome! Send me a message and I will echo it.")
    end,
  },
}

-- An unset variable, or an empty one, is absent.
local function getenv(name)
  local v = os.getenv(name)
  if v == "" then return nil end
  return v
end

local function settings()
  local mp = wxd.config and wxd.config.mp
  if type(mp) == "table" and mp.token then
    return { appid = mp.appid or nil, token = mp.token, aes_key = mp.aes_key or nil, secret = mp.secret or nil,
      api_base = mp.api_base or nil }
  end
  return { appid = getenv("WXD_MP_APPID"), token = getenv("WXD_MP_TOKEN"), aes_key = getenv("WXD_MP_AES_KEY"),
    secret = getenv("WXD_MP_SECRET"), api_base = getenv("WXD_WECHAT_API_BASE") }
end

return function(app)
  local cfg = settings()
  if not (cfg.appid and cfg.token) then
    if wxd.worker_id() <= 0 then -- one line, not one per worker
      log.info("wechat: /wx not mounted: set WXD_MP_APPID and WXD_MP_TOKEN (and WXD_MP_AES_KEY for safe mode)")
    end
    return
  end
  app:mp("/wx", cfg, handlers)
  if cfg.secret then
    app:get("/jssdk/config", require("wxd.wechat").client(cfg):jssdk_handler())
  end
end
