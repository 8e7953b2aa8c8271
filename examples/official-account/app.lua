-- examples/official-account: an Official Account callback at /wx.
--
--   WXD_MP_APPID=wx... WXD_MP_TOKEN=... WXD_MP_AES_KEY=... build/wxd run examples/official-account
--
-- Then set the server URL of the account to https://<your host>/wx (behind a
-- proxy that terminates TLS), with the same Token and EncodingAESKey.
local wxd = require "wxd"
local app = require("wxd.app").new()

require("handlers.wechat").mount(app, wxd.config.mp)

app:get("/health", function() return { status = "ok" } end)

return app
