# Stop VM ERP-01: graceful (shutdown, up to 300s), then force.
#   shutdown: Stop-VM -Force (guest OS shutdown via the Shutdown integration service)
#   save:     Stop-VM -Save (memory to the replicated folder)
#   off:      Stop-VM -TurnOff -Force (power cut)
#   force (any mode, the agent's last resort): Stop-VM -TurnOff -Force
param([ValidateSet('graceful', 'force')][string]$Mode = 'graceful')
. (Join-Path $PSScriptRoot 'env.ps1')
$vm = Get-VM -Name $VmName -ErrorAction SilentlyContinue
if (-not $vm -or $vm.State -eq 'Off' -or $vm.State -eq 'Saved') { exit 0 }
if ($Mode -eq 'force') { Stop-VM -VM $vm -TurnOff -Force; exit 0 }
$job = Stop-VM -VM $vm -Force -AsJob
$done = Wait-Job $job -Timeout ([Math]::Max(1, $GracefulTimeout - 1))
if (-not $done) {
    Stop-Job $job; Remove-Job $job -Force
    Write-Output "VM $VmName did not stop within $($GracefulTimeout - 1)s"
    exit 1
}
if ($job.State -eq 'Failed') {
    $reason = $job.ChildJobs[0].JobStateInfo.Reason
    Remove-Job $job -Force
    Write-Output "VM ${VmName}: shutdown failed: $reason"
    exit 1
}
Remove-Job $job -Force
$state = (Get-VM -Name $VmName).State
if ($state -ne 'Off' -and $state -ne 'Saved') { Write-Output "VM $VmName is still $state"; exit 1 }
exit 0
