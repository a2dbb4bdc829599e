// Incident alerts as JSON POSTs to an operator's webhook: queued, retried with
// exponential backoff, bounded, and never awaited by anything on the query path.

import type { Logger } from 'pino';

export interface WebhookOptions {
  readonly url: string;
  readonly log: Logger;
  readonly maxAttempts?: number;
  readonly timeoutMs?: number;
  readonly queueLimit?: number;
  /** First retry delay; doubles each attempt. */
  readonly backoffMs?: number;
}

/**
 * The webhook as logs may show it: scheme and host only. A webhook URL often is
 * a secret (Slack and similar services put the credential in the path or query).
 */
export function redactWebhookUrl(url: string): string {
  try {
    const parsed = new URL(url);
    return `${parsed.protocol}//${parsed.host}/...`;
  } catch {
    return '(invalid URL)';
  }
}

export class WebhookSender {
  private readonly queue: unknown[] = [];
  private sending = false;
  private readonly target: string;
  delivered = 0;
  dropped = 0;

  constructor(private readonly options: WebhookOptions) {
    this.target = redactWebhookUrl(options.url);
  }

  send(payload: unknown): void {
    if (this.queue.length >= (this.options.queueLimit ?? 100)) {
      this.dropped++;
      this.options.log.warn({ webhook: this.target }, 'webhook queue full: alert dropped');
      return;
    }
    this.queue.push(payload);
    if (!this.sending) void this.drain();
  }

  private async drain(): Promise<void> {
    this.sending = true;
    while (this.queue.length > 0) {
      const payload = this.queue.shift();
      if (await this.deliver(payload)) this.delivered++;
      else this.dropped++;
    }
    this.sending = false;
  }

  private async deliver(payload: unknown): Promise<boolean> {
    const attempts = this.options.maxAttempts ?? 5;
    let delay = this.options.backoffMs ?? 1000;
    for (let attempt = 1; attempt <= attempts; attempt++) {
      try {
        const response = await fetch(this.options.url, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', 'User-Agent': 'pgwarden' },
          body: JSON.stringify(payload),
          signal: AbortSignal.timeout(this.options.timeoutMs ?? 5000),
        });
        if (response.ok) return true;
        this.options.log.warn(
          { webhook: this.target, status: response.status, attempt },
          'webhook answered with an error',
        );
      } catch (err) {
        // fetch's errors can quote the URL: log the cause's code, not its message.
        const error = err as Error & { cause?: { code?: string } };
        const reason = error.name === 'TimeoutError' ? 'timed out' : (error.cause?.code ?? error.name);
        this.options.log.warn({ webhook: this.target, reason, attempt }, 'webhook delivery failed');
      }
      if (attempt < attempts) {
        await new Promise((resolve) => setTimeout(resolve, delay).unref());
        delay *= 2;
      }
    }
    return false;
  }
}
