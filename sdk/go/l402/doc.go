// Package l402 lets a Go program call L402 (and LSAT) APIs, paying their Lightning invoices
// within limits, with the safety of l402proxy's Python client.
//
//	wallet, err := l402.NewLNDWalletFromFiles("127.0.0.1:8080", "tls.cert", "admin.macaroon")
//	...
//	client := &http.Client{Transport: l402.NewTransport(http.DefaultTransport, wallet,
//		l402.Limits{MaxPriceSat: 100, MaxFeeSat: 10, DailyBudgetSat: 1000})}
//	resp, err := client.Get("https://api.example.com/premium/report")
//
// The Transport says "Accept-Authenticate: L402", reads every challenge shape seen in the wild
// (L402 and LSAT, macaroon= and token=, any order, quoting and base64 flavour, other schemes
// around it), and before paying checks that the invoice's payment hash is the one the
// macaroon names, that the invoice has an amount, has not expired, is for the wallet's
// network, and fits MaxPriceSat and the daily and total budgets, and that the host is allowed.
// Concurrent requests for one scope (the server's services= caveat, else the directory) share
// one payment. Tokens are kept per scope and sent up front; a file store (OpenFileStore)
// keeps them, and the ledger the budgets are counted on, across restarts, writing each payment
// as pending before paying and its token before the request is sent again.
//
// Wallets: LNDWallet (LND's REST API), DevWallet (l402proxy's dev ledger, for examples and
// tests), or any type with the two methods of Wallet. Package l402test has a toy L402 server
// and a wallet for tests of code that uses this package.
//
// Standard library only: the macaroon (V2 binary) and the BOLT11 invoice are decoded here.
// Invoice signatures are not checked (the standard library has no secp256k1); the wallet
// checks them when it pays.
package l402
