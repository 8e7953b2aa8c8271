-- examples/pay: WeChat Pay v3 (JSAPI / Mini Program), configured from the
-- environment only (secrets never go in this file):
--
--   WXD_PAY_MCHID               the merchant id
--   WXD_PAY_APPID               the appid the payments are for
--   WXD_PAY_APIV3_KEY           the APIv3 key (32 bytes)
--   WXD_PAY_MCH_KEY_FILE        the merchant private key, PEM (apiclient_key.pem)
--   WXD_PAY_MCH_SERIAL          the merchant certificate's serial
--   WXD_PAY_PLATFORM_CERT_FILE  a platform certificate to start with (optional: it is downloaded anyway)
--   WXD_PAY_PUBLIC_KEY_FILE, WXD_PAY_PUBLIC_KEY_ID   public key mode instead (PUB_KEY_ID_...)
--   WXD_PAY_API_BASE            default https://api.mch.weixin.qq.com
--   WXD_PAY_NOTIFY_URL          the public URL of POST /pay/notify
--   WXD_PAY_ORDER_JOURNAL       where the orders' journal goes (default orders.journal in this directory)
return {
  listen = "127.0.0.1:8080",
  order = { journal = env("WXD_PAY_ORDER_JOURNAL", "orders.journal") },
  pay = {
    mchid = env("WXD_PAY_MCHID"),
    appid = env("WXD_PAY_APPID"),
    apiv3_key = env("WXD_PAY_APIV3_KEY"),
    mch_key_file = env("WXD_PAY_MCH_KEY_FILE"),
    mch_serial = env("WXD_PAY_MCH_SERIAL"),
    platform_cert_file = env("WXD_PAY_PLATFORM_CERT_FILE", false),
    public_key_file = env("WXD_PAY_PUBLIC_KEY_FILE", false),
    public_key_id = env("WXD_PAY_PUBLIC_KEY_ID", false),
    api_base = env("WXD_PAY_API_BASE", "https://api.mch.weixin.qq.com"),
    notify_url = env("WXD_PAY_NOTIFY_URL", "https://example.com/pay/notify"),
  },
}
