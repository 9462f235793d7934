"""English and Simplified Chinese. Templates write `_("English text")`; Chinese comes from the
table below, chosen by the `lang` cookie (the switch), else Accept-Language. A test checks
that every string the templates and pages use has its Chinese."""
from __future__ import annotations

LANGS = ("en", "zh")
COOKIE = "lang"


def choose(cookie: str | None, accept_language: str | None) -> str:
    if cookie in LANGS:
        return cookie  # type: ignore[return-value]
    best, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = tag.strip().lower().split("-")[0]
        if lang in LANGS and q > best_q:
            best, best_q = lang, q
    return best


def translator(lang: str):
    table = ZH if lang == "zh" else {}

    def _(text: str) -> str:
        return table.get(text, text)
    return _


ZH: dict[str, str] = {
    # frame
    "Skip to content": "跳到正文",
    "Main": "主导航",
    "Dashboard": "概览",
    "Keys": "密钥",
    "Setup": "工具配置",
    "Plans & billing": "套餐与账单",
    "Log out": "退出登录",
    "Log in": "登录",
    "Sign up": "注册",
    "Language": "语言",
    "Admin": "管理员",
    "Account": "账户",
    "Codeplan: a GLM-4.6 coding plan for the tools you already use.": "Codeplan：在你已有的编程工具里使用 GLM-4.6 编程套餐。",
    # sign up / log in
    "Create your account": "创建账户",
    "Email": "邮箱",
    "Password": "密码",
    "At least 10 characters.": "至少 10 个字符。",
    "Create account": "创建账户",
    "Already have an account?": "已有账户？",
    "No account yet?": "还没有账户？",
    "Forgot your password?": "忘记密码？",
    "Accounts made by an operator have no password yet: set one with “Forgot your password?”.":
        "由管理员创建的账户还没有密码：请通过“忘记密码？”设置。",
    "Enter one email address in plain ASCII letters, such as name@example.com.":
        "请输入一个仅含 ASCII 字符的邮箱地址，例如 name@example.com。",
    "The password needs at least 10 characters.": "密码至少需要 10 个字符。",
    "That password is too long.": "密码太长。",
    "An account with this email exists already. Log in, or reset its password.":
        "该邮箱已有账户。请登录，或重置密码。",
    "Wrong email or password.": "邮箱或密码错误。",
    "Too many failed attempts. Try again in {minutes} minutes.": "失败次数过多，请在 {minutes} 分钟后重试。",
    "Too many sign-ups from your address. Try again in {minutes} minutes.":
        "来自你的地址的注册次数过多，请在 {minutes} 分钟后重试。",
    "Mail is off on this server: verification links are written to the server's log, and verifying is not required.":
        "本服务器未配置邮件：验证链接会写入服务器日志，无需验证邮箱。",
    "We send a link to confirm your address.": "我们会发送一封邮件来确认你的邮箱地址。",
    # verify / reset
    "Check your mail": "请查收邮件",
    "We sent a link to {email}. Open it to confirm your address; it is valid for 48 hours.":
        "我们已向 {email} 发送了一个链接。打开它以确认你的邮箱地址，48 小时内有效。",
    "Send the link again": "重新发送链接",
    "The mail could not be sent. Try again in a few minutes.": "邮件发送失败，请几分钟后再试。",
    "Too many mails were sent in the last hour. Try again later.": "过去一小时内发送的邮件过多，请稍后再试。",
    "A new link is on its way.": "新的链接已发送。",
    "Your address is confirmed.": "你的邮箱地址已确认。",
    "This link is not valid any more. Ask for a new one.": "此链接已失效，请重新申请。",
    "Confirm your address": "确认邮箱地址",
    "Confirm {email} as the address of your Codeplan account.": "确认 {email} 为你的 Codeplan 账户邮箱。",
    "Confirm my address": "确认我的邮箱",
    "If you did not sign up at Codeplan, close this page: nothing is confirmed without this button.":
        "如果你没有注册 Codeplan，请关闭此页面：不点击此按钮就不会确认任何内容。",
    "Reset your password": "重置密码",
    # account
    "confirmed": "已确认",
    "not confirmed yet": "尚未确认",
    "Change your password": "修改密码",
    "Current password": "当前密码",
    "At least 10 characters. Every other browser signed in to this account is signed out.":
        "至少 10 个字符。此账户在其他浏览器上的登录都会退出。",
    "Change the password": "修改密码",
    "The current password is wrong.": "当前密码错误。",
    "Other browsers": "其他浏览器",
    "This account is signed in on {count} other browsers or devices.": "此账户已在另外 {count} 个浏览器或设备上登录。",
    "Sign them all out": "全部退出登录",
    "This account is signed in on no other browser.": "此账户没有在其他浏览器上登录。",
    "API keys are not affected: revoke them on the Keys page.": "API 密钥不受影响：请在“密钥”页面吊销。",
    "Your password is changed. Every other browser is signed out.": "密码已修改，其他浏览器上的登录均已退出。",
    "Every other browser is signed out.": "其他浏览器上的登录均已退出。",
    # account: a new address, closing
    "Change your email address": "更改邮箱地址",
    "New email address": "新邮箱地址",
    "We mail a link to the new address; the address changes once it is confirmed there. The old address is told.":
        "我们会向新地址发送一个链接；在那里确认后，地址才会更改。旧地址会收到通知。",
    "Send the confirmation link": "发送确认链接",
    "We sent a link to the new address. Your address changes once you open it and confirm.":
        "我们已向新地址发送了一个链接。打开并确认后，你的地址才会更改。",
    "Your address is changed and confirmed.": "你的邮箱地址已更改并确认。",
    "That is this account's address already.": "这已经是此账户的邮箱地址。",
    "Another account uses this address already.": "另一个账户已在使用此地址。",
    "This address belongs to another account now: it was taken after the link was sent. Your address is unchanged.":
        "此地址现在属于另一个账户：它在链接发出后被占用了。你的邮箱地址没有更改。",
    "Confirm your new address": "确认新邮箱地址",
    "Make {email} the address of your Codeplan account.": "将 {email} 设为你的 Codeplan 账户邮箱。",
    "Confirm the new address": "确认新地址",
    "If you did not ask for this, close this page: nothing changes without this button.":
        "如果这不是你本人的操作，请关闭此页面：不点击此按钮就不会有任何更改。",
    "Someone asked to make {email} the address of a Codeplan account. Open the link and confirm to do so; it is valid for 48 hours. If it was not you, ignore this mail: nothing changes.":
        "有人请求将 {email} 设为某个 Codeplan 账户的邮箱。打开链接并确认即可完成更改，48 小时内有效。如果不是你本人，请忽略此邮件：不会有任何更改。",
    "Your address is being changed": "你的邮箱地址正在更改",
    "Your Codeplan account's address is being changed to {email}: it changes once a link mailed there is confirmed. If this wasn't you, change your password now and sign out every other browser, on the Account page:":
        "你的 Codeplan 账户邮箱正在更改为 {email}：发往该地址的链接被确认后即生效。如果这不是你本人的操作，请立即在“账户”页面修改密码并退出其他浏览器上的登录：",
    "Close your account": "关闭账户",
    "Closing is final: every API key stops working, every browser is signed out, a plan given by the operator ends, and the address is free for a new account. Usage and invoices are kept.":
        "关闭后无法恢复：所有 API 密钥停止工作，所有浏览器退出登录，管理员分配的套餐结束，邮箱地址可用于注册新账户。用量和发票记录会保留。",
    "A plan paid through Stripe is canceled in the billing portal first (Plans & billing).":
        "通过 Stripe 付费的套餐需要先在账单门户中取消（套餐与账单）。",
    "Type your email address to confirm": "输入你的邮箱地址以确认",
    "Close the account": "关闭此账户",
    "Type this account's email address to confirm.": "请输入此账户的邮箱地址以确认。",
    "This account's plan is paid through Stripe: cancel it in the billing portal first (Plans & billing), then close the account.":
        "此账户的套餐通过 Stripe 付费：请先在账单门户中取消（套餐与账单），再关闭账户。",
    "Your account is closed": "你的账户已关闭",
    "You are signed out. The account's API keys no longer work, and its address is free for a new account.":
        "你已退出登录。此账户的 API 密钥已失效，其邮箱地址可用于注册新账户。",
    "Your Codeplan account ({email}) is closed: its API keys no longer work, every browser is signed out, and the address is free for a new account. If this wasn't you, write to the operator of this service.":
        "你的 Codeplan 账户（{email}）已关闭：其 API 密钥已失效，所有浏览器均已退出登录，该邮箱地址可用于注册新账户。如果这不是你本人的操作，请联系本服务的管理员。",
    "Enter your account's email. If it exists, we send a link to set a new password.":
        "输入账户的邮箱。如果账户存在，我们会发送一个设置新密码的链接。",
    "Send the link": "发送链接",
    "If an account exists for {email}, a link to set a new password is on its way. It is valid for 2 hours.":
        "如果 {email} 有对应的账户，设置新密码的链接已发送，2 小时内有效。",
    "Mail is off on this server: the link was written to the server's log. Ask the operator for it.":
        "本服务器未配置邮件：链接已写入服务器日志，请向管理员索取。",
    "Set a new password": "设置新密码",
    "New password": "新密码",
    "Save the password": "保存密码",
    "Your password is set. You are signed in.": "密码已设置，你已登录。",
    # dashboard
    "Your plan": "你的套餐",
    "Status": "状态",
    "active": "有效",
    "past_due": "待付款",
    "canceled": "已取消",
    "trialing": "试用中",
    "Billed through Stripe": "通过 Stripe 计费",
    "Assigned by the operator": "由管理员分配",
    "No plan yet": "尚无套餐",
    "This account has no plan, so its keys cannot be used yet.": "此账户没有套餐，因此密钥暂时无法使用。",
    "Choose a plan on the billing page.": "请在账单页面选择套餐。",
    "Billing is off on this server: ask the operator to give your account a plan.":
        "本服务器未开启计费：请联系管理员为你的账户分配套餐。",
    "5-hour window": "5 小时窗口",
    "Weekly window": "每周窗口",
    "used": "已用",
    "reserved": "预留",
    "remaining": "剩余",
    "of": "共",
    "tokens": "tokens",
    "Resets": "重置于",
    "Opens with your next request": "下一次请求时开启",
    "Live": "实时",
    "Connecting…": "连接中…",
    "Reconnecting…": "重新连接中…",
    "Signed out: sign in again to see live usage.": "已退出登录：请重新登录以查看实时用量。",
    "No plan: live usage starts with one.": "暂无套餐：订阅后即可查看实时用量。",
    "Live usage stopped: reload the page.": "实时用量已停止：请刷新页面。",
    "Updated": "更新于",
    "Tokens per day, last 30 days (UTC)": "每日 tokens，最近 30 天（UTC）",
    "No usage in the last 30 days.": "最近 30 天没有用量。",
    "Day": "日期",
    "Total": "合计",
    "Show the figures as a table": "以表格显示数据",
    "Today (UTC)": "今天（UTC）",
    "requests": "次请求",
    "billed tokens": "计费 tokens",
    "Time": "时间",
    "Model": "模型",
    "Surface": "接口",
    "State": "状态",
    "Prompt": "输入",
    "Completion": "输出",
    "Billed": "计费",
    "No requests today.": "今天还没有请求。",
    "Top-ups": "加油包",
    "Overage": "超额用量",
    # the columns of the top-up and overage tables (dashboard._EXTRA_COLUMNS; "used" and
    # "remaining" are the meters')
    "allowance": "额度",
    "in flight": "进行中",
    "ends": "到期时间",
    # a request's state in today's table (usage_ledger.state)
    "pending": "进行中",
    "posted": "已入账",
    "voided": "已作废",
    "expired": "已过期",
    "Confirm your address to create keys and use your plan.": "确认邮箱地址后才能创建密钥并使用套餐。",
    # keys
    "API keys": "API 密钥",
    "Create a key": "创建密钥",
    "Name": "名称",
    "e.g. laptop, CI": "例如：笔记本、CI",
    "Create": "创建",
    "Your new key": "你的新密钥",
    "Copy it now: it is shown only once.": "请立即复制：它只显示这一次。",
    "Copy": "复制",
    "Copied": "已复制",
    "Prefix": "前缀",
    "Created": "创建于",
    "Last used": "最近使用",
    "never": "从未",
    "revoked": "已吊销",
    "Revoke": "吊销",
    "Revoke key {prefix}…? Tools using it stop working.": "吊销密钥 {prefix}…？使用它的工具将停止工作。",
    "No keys yet.": "还没有密钥。",
    "The key was revoked.": "密钥已吊销。",
    "That key does not exist or was revoked already.": "该密钥不存在或已被吊销。",
    "This account has too many keys. Revoke one first.": "此账户的密钥太多，请先吊销一个。",
    "Set up your tools with this key": "用这个密钥配置你的工具",
    # setup
    "Set up your coding tools": "配置你的编程工具",
    "Server": "服务器",
    "These snippets use your new key. It is not stored in the page: copy what you need now.":
        "这些配置使用了你的新密钥。页面不会保存它：请现在复制所需内容。",
    "Replace cp_YOUR_KEY with one of your keys, or create a key here to fill it in.":
        "请将 cp_YOUR_KEY 替换为你的密钥，或在此创建一个密钥自动填入。",
    "Create a key for this setup": "为此配置创建密钥",
    "Then run in a shell:": "然后在终端运行：",
    "Download the status line script (it needs only Python 3):": "下载状态栏脚本（只需要 Python 3）：",
    "It shows the 5-hour and weekly windows under the prompt.": "它会在输入框下方显示 5 小时和每周窗口的用量。",
    "Kilo reads the same file: point KILO_CONFIG at it.": "Kilo 读取同一个文件：将 KILO_CONFIG 指向它。",
    "In a terminal": "在终端中",
    "Codex needs the Responses API, which this server does not serve yet.": "Codex 需要 Responses API，本服务器暂不提供。",
    "Usage in your terminal or IDE": "在终端或 IDE 中查看用量",
    "Field": "字段",
    "Value": "值",
    # plans
    "Plans": "套餐",
    "per month": "每月",
    "tokens per 5 hours": "tokens / 5 小时",
    "tokens per week": "tokens / 周",
    "Models": "模型",
    "Requests at once": "并发请求",
    "unlimited": "不限",
    "Your plan now": "当前套餐",
    "Subscribe": "订阅",
    "Change to this plan": "切换到此套餐",
    "Manage billing": "管理账单",
    "Payment failed": "付款失败",
    "Your last payment failed: requests are refused until it is paid.": "您最近一次付款失败：付清之前所有请求都会被拒绝。",
    "Your last payment failed. Pay it before this time (UTC) to keep your plan:": "您最近一次付款失败。请在此时间（UTC）之前付款以保留套餐：",
    "Pay the invoice": "支付账单",
    "Or update your payment method in Stripe's billing portal below.": "也可以在下方的 Stripe 账单门户中更新付款方式。",
    "Invoices, payment method and cancellation are in Stripe's billing portal.": "发票、付款方式和取消订阅都在 Stripe 的账单门户中。",
    "Buy a top-up": "购买加油包",
    "A block of tokens used after a window runs out.": "一份在窗口用尽后使用的额外 tokens。",
    "Buy": "购买",
    "Billing is off on this server (no Stripe keys). Plans are assigned by the operator (codeplan users create --plan).":
        "本服务器未开启计费（没有 Stripe 密钥）。套餐由管理员分配（codeplan users create --plan）。",
    "Billing could not start. Try again in a moment.": "无法开始付款，请稍后再试。",
    "This account is suspended by the operator: it cannot buy a plan or a top-up.":
        "此账户已被管理员停用：无法购买套餐或加油包。",
    "This account is suspended by the operator: its API keys are refused (403 account_suspended) until the operator restores it.":
        "此账户已被管理员停用：在管理员恢复之前，它的 API 密钥会被拒绝（403 account_suspended）。",
    "No key was made: a key was created since this form was shown (a reload, or another tab). Create one again if you want another.":
        "未创建密钥：此表单显示后已创建过密钥（页面重新加载或其他标签页）。如需再建一个，请重新创建。",
    "Payment received: your plan changes as soon as Stripe confirms it.": "已收到付款：Stripe 确认后套餐将立即生效。",
    # errors
    "Page not found": "页面不存在",
    "This page does not exist.": "此页面不存在。",
    "Not allowed": "不允许",
    "The form expired or came from another site. Go back, reload the page and try again.":
        "表单已过期或来自其他网站。请返回、刷新页面后重试。",
    "Something went wrong": "出错了",
    "The server failed unexpectedly; the failure was logged.": "服务器发生意外错误，已记录日志。",
    "The request was not understood.": "无法理解该请求。",
    "Back to the dashboard": "返回概览",
}
